"""`mobiserve evaluate` and `mobiserve quantize`, run as the command line runs them (in-process).

Evaluation and quantization are the slow parts (tens of seconds on a loaded 2-core machine), so
each runs once per module and the tests read its result.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc

from mobiserve.common.command import main
from mobiserve.common.labels import Labels
from mobiserve.server.processing.postprocess import rank
from mobiserve.server.processing.preprocess import ImageLimits, preprocess_encoded
from mobiserve.server.runtime.model import Model
from mobiserve.server.runtime.session import SessionTuning
from mobiserve.server.workflows.dataset import spread
from mobiserve.server.workflows.quantize import QuantizeOptions
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import SAMPLE, SYNSETS, model_config, request_of, start_server

pytestmark = pytest.mark.slow  # real processes or whole-sample sweeps

# The card's pipeline on the shared sample (../shared/models/README.md): top-1, top-5.
REFERENCE = {"int8": (0.8350, 0.9515), "fp32": (0.8291, 0.9650)}
CALIBRATION_COUNT = 100


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        assert self.code == 0, self.stderr[-2000:]
        data: dict[str, Any] = json.loads(self.stdout)
        return data

    def error_line(self) -> str:
        """The last stderr line, which must be the one-line error."""
        assert self.code != 0, self.stdout
        return self.stderr.strip().splitlines()[-1]


def mobiserve(*args: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return Run(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def evaluated(int8_model: Path, fp32_model: Path) -> dict[str, dict[str, Any]]:
    """Both models evaluated on the whole sample, with a short timing pass."""
    return {
        name: mobiserve(
            "evaluate",
            str(path),
            "--images",
            str(SAMPLE),
            "--synsets",
            str(SYNSETS),
            "--batch-size",
            "1",
            "8",
            "32",
            "--rounds",
            "2",
            "--json",
        ).json()
        for name, path in (("int8", int8_model), ("fp32", fp32_model))
    }


@pytest.mark.parametrize("name", ["int8", "fp32"])
def test_evaluate_reproduces_the_reference(evaluated: dict[str, dict[str, Any]], name: str) -> None:
    result = evaluated[name]
    top1, top5 = REFERENCE[name]
    assert result["count"] == 515 and result["skipped"] == 0
    assert abs(result["top1"] - top1) <= 0.005
    assert abs(result["top5"] - top5) <= 0.005


def test_evaluate_reports_latency_and_throughput(evaluated: dict[str, dict[str, Any]]) -> None:
    result = evaluated["int8"]
    assert set(result["throughput_by_batch_size"]) == {"1", "8", "32"}
    assert result["throughput_images_per_s"] == max(result["throughput_by_batch_size"].values())
    assert str(result["best_batch_size"]) in result["throughput_by_batch_size"]
    assert result["latency_ms_batch1"] > 0


def test_evaluate_reads_imagenet_style_folders(tmp_path: Path, int8_model: Path, sample_images: list[Path]) -> None:
    """`<wnid>/` folders and `<wnid>_*.JPEG` names label the same images the same way."""
    flat, nested = tmp_path / "flat", tmp_path / "val"
    flat.mkdir()
    for path in sample_images[::20]:  # symlinks: the images stay in ../shared
        (flat / path.name).symlink_to(path)
        wnid = path.name.split("_")[0]
        (nested / wnid).mkdir(parents=True, exist_ok=True)
        (nested / wnid / f"ILSVRC2012_val_{wnid}.JPEG").symlink_to(path)
    (nested / "README.txt").write_text("not an image")
    args = ("--synsets", str(SYNSETS), "--rounds", "0", "--json")
    by_name = mobiserve("evaluate", str(int8_model), "--images", str(flat), *args).json()
    by_folder = mobiserve("evaluate", str(int8_model), "--images", str(nested), *args).json()
    assert by_name["count"] == by_folder["count"] == len(sample_images[::20])
    assert (by_name["top1"], by_name["top5"]) == (by_folder["top1"], by_folder["top5"])


def test_evaluate_without_labelled_images_is_a_clear_error(tmp_path: Path, int8_model: Path, jpeg: bytes) -> None:
    (tmp_path / "holiday.jpg").write_bytes(jpeg)
    line = mobiserve("evaluate", str(int8_model), "--images", str(tmp_path)).error_line()
    assert line.startswith("mobiserve: error: no labelled images") and "<wnid>" in line


# ------------------------------------------------------------------------------------- quantize


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory, fp32_model: Path) -> tuple[Path, dict[str, Any]]:
    """The fp32 stand-in quantized with the default options on 100 sample images; the other 415
    are the held-out comparison."""
    output = tmp_path_factory.mktemp("quantized") / "mobilenetv2-int8-mine.onnx"
    result = mobiserve(
        "quantize",
        str(fp32_model),
        "--calibration",
        str(SAMPLE),
        "--output",
        str(output),
        "--calibration-count",
        str(CALIBRATION_COUNT),
        "--synsets",
        str(SYNSETS),
        "--rounds",
        "5",
        "--json",
    ).json()
    return output, result


def test_quantize_with_defaults_loses_at_most_two_points(quantized: tuple[Path, dict[str, Any]]) -> None:
    _, result = quantized
    defaults = QuantizeOptions()
    assert result["calibration_images"] == CALIBRATION_COUNT
    assert result["eval_images"] == result["labelled_eval_images"] == 515 - CALIBRATION_COUNT
    assert result["disjoint"] is True and result["eval_left_out_as_calibration_images"] == 0
    assert (result["method"], result["format"], result["per_channel"]) == (
        defaults.method,
        defaults.format,
        defaults.per_channel,
    )
    assert result["options"] == defaults.describe()
    fp32, int8 = result["fp32"], result["int8"]
    print(f"held-out agreement with fp32 {result['agreement']:.3f}")
    assert 0.5 < result["agreement"] <= 1
    print(f"held-out top-1 fp32={fp32['top1']:.4f} int8={int8['top1']:.4f} speedup={result['speedup_batch1']:.2f}")
    assert fp32["top1"] - int8["top1"] <= 0.02
    assert result["top1_decline_ratio"] == pytest.approx((fp32["top1"] - int8["top1"]) / fp32["top1"])
    assert result["top5_decline_ratio"] == pytest.approx((fp32["top5"] - int8["top5"]) / fp32["top5"])
    assert result["speedup_batch1"] > 0


def test_quantized_model_is_qdq_with_per_channel_weights(quantized: tuple[Path, dict[str, Any]]) -> None:
    model = onnx.load(str(quantized[0]))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    dequantize = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dequantize and any(a.name == "axis" for n in dequantize for a in n.attribute)


async def test_quantized_model_serves(quantized: tuple[Path, dict[str, Any]], sample_images: list[Path]) -> None:
    """Through a real server, the quantized model answers as it does in-process."""
    path, _ = quantized
    calibration = set(spread(CALIBRATION_COUNT, len(sample_images)))
    images = [p for i, p in enumerate(sample_images) if i not in calibration][:16]
    app = await start_server(model_config(path, name="mine", max_batch_size=16))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            reply = await pb_grpc.ClassifierStub(channel).Classify(
                request_of(*(p.read_bytes() for p in images), model="mine"), timeout=120
            )
    finally:
        await app.stop(grace_s=5)
    local = Model(path, Labels.load(SYNSETS), SessionTuning(intra_op_threads=2))
    expected = local.infer([preprocess_encoded(p.read_bytes(), ImageLimits()) for p in images]).order[:, 0]
    assert reply.model == "mine"
    assert [r.classes[0].index for r in reply.results] == expected.tolist()


def test_the_command_line_defaults_are_the_options_defaults() -> None:
    from mobiserve.common.command import build_parser
    from mobiserve.server.workflows.cli import quantize_options

    args = build_parser().parse_args(["quantize", "m.onnx", "--calibration", "d", "--output", "o.onnx"])
    assert quantize_options(args) == QuantizeOptions()
    args = build_parser().parse_args(
        [
            "quantize",
            "m.onnx",
            "--calibration",
            "d",
            "--output",
            "o.onnx",
            "--format",
            "qoperator",
            "--method",
            "minmax",
            "--keep-float",
            "classifier",
            "--keep-float",
            "classifier",
            "--no-per-channel",
        ]
    )
    chosen = quantize_options(args)
    assert (chosen.format, chosen.method, chosen.keep_float, chosen.per_channel) == (
        "qoperator",
        "minmax",
        ("classifier",),
        False,
    )


@pytest.fixture(scope="module")
def qoperator(
    tmp_path_factory: pytest.TempPathFactory, fp32_model: Path, sample_images: list[Path]
) -> tuple[Path, Run, Path]:
    """A QOperator model calibrated on 20 images, compared on an --eval folder that holds 3 of them
    (which must be left out), 9 other labelled images and 2 without labels."""
    root = tmp_path_factory.mktemp("qoperator")
    calibration, evaluation = root / "calibration", root / "eval"
    calibration.mkdir()
    evaluation.mkdir()
    chosen = sample_images[::25][:20]
    for path in chosen:
        (calibration / path.name).symlink_to(path)
    for path in chosen[:3]:  # the same bytes under other names: still calibration images
        (evaluation / f"copy-{path.name}").write_bytes(path.read_bytes())
    for path in sample_images[1::50][:9]:
        (evaluation / path.name).symlink_to(path)
    for i, path in enumerate(sample_images[2::100][:2]):
        (evaluation / f"holiday-{i}.jpg").symlink_to(path)
    output = root / "int8-qoperator.onnx"
    run = mobiserve(
        "quantize",
        str(fp32_model),
        "--calibration",
        str(calibration),
        "--eval",
        str(evaluation),
        "--output",
        str(output),
        "--format",
        "qoperator",
        "--method",
        "minmax",
        "--synsets",
        str(SYNSETS),
        "--rounds",
        "2",
    )
    return output, run, evaluation


def test_quantize_keeps_calibration_images_out_of_the_comparison(qoperator: tuple[Path, Run, Path]) -> None:
    _, run, _ = qoperator
    assert run.code == 0, run.stderr
    assert "calibrated on 20 images; compared on 11 other images" in run.stdout
    assert "none of them is a calibration image (3 --eval images left out" in run.stdout
    assert "agreement with fp32" in run.stdout and "on 11 images (9 labelled)" in run.stdout


async def test_a_qoperator_model_serves_classify_and_the_inference_protocol(
    qoperator: tuple[Path, Run, Path], sample_images: list[Path]
) -> None:
    path, _, _ = qoperator
    model = onnx.load(str(path))
    assert "QLinearConv" in {n.op_type for n in model.graph.node}
    images = [p.read_bytes() for p in sample_images[300:304]]
    app = await start_server(model_config(path, name="mine"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            reply = await pb_grpc.ClassifierStub(channel).Classify(request_of(*images, model="mine"), timeout=120)
            tensor = tpb.ModelInferRequest.InferInputTensor(name="encoded_image", datatype="BYTES", shape=[4, 1])
            raw = b"".join(len(b).to_bytes(4, "little") + b for b in images)
            request = tpb.ModelInferRequest(model_name="mine_image", inputs=[tensor], raw_input_contents=[raw])
            inferred = await tpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120)
    finally:
        await app.stop(grace_s=5)
    local = Model(path, Labels.load(SYNSETS), SessionTuning(intra_op_threads=2))
    expected = local.infer([preprocess_encoded(b, ImageLimits()) for b in images]).order[:, 0]
    assert [r.classes[0].index for r in reply.results] == expected.tolist()
    scores = np.frombuffer(inferred.raw_output_contents[0], dtype="<f4").reshape(4, -1)
    assert rank(scores)[:, 0].tolist() == expected.tolist()


def _tiny_model(path: Path, side: int) -> Path:
    """A valid ONNX classifier whose input is [N, 3, side, side]."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, side, side])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["output"]),
        ],
        "tiny",
        [x],
        [y],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


@pytest.mark.parametrize("case", ["not onnx", "wrong input shape", "empty calibration folder", "already int8"])
def test_quantize_bad_input_is_a_one_line_error(tmp_path: Path, fp32_model: Path, int8_model: Path, case: str) -> None:
    model, calibration = fp32_model, SAMPLE
    if case == "not onnx":
        model = tmp_path / "model.onnx"
        model.write_text("definitely not a protobuf\n")
    elif case == "wrong input shape":
        model = _tiny_model(tmp_path / "small.onnx", 112)
    elif case == "empty calibration folder":
        calibration = tmp_path / "empty"
        calibration.mkdir()
    else:
        model = int8_model
    output = tmp_path / "out.onnx"
    run = mobiserve("quantize", str(model), "--calibration", str(calibration), "--output", str(output))
    line = run.error_line()
    expected = {
        "not onnx": "is not an ONNX model",
        "wrong input shape": "expected float [N, 3, 224, 224]",
        "empty calibration folder": "no images in calibration folder",
        "already int8": "is quantized already",
    }[case]
    assert line.startswith("mobiserve: error:") and expected in line, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not output.exists()


def test_spread_is_even_and_unique() -> None:
    for total in (1, 2, 7, 100, 515):
        for count in (1, 2, 5, 100, 600):
            picked = spread(count, total)
            assert len(picked) == min(count, total) == len(set(picked))
            assert all(0 <= i < total for i in picked)
    assert np.diff(spread(5, 101)).tolist() == [25, 25, 25, 25]
