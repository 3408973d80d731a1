"""The zoo's models on disk: `mobiserve models pull` keeps only what it can vouch for, says where
a copy must go when there is no network, and a damaged zoo file says how to fetch it again.
In-process (`models pull` is a client command) on the shared models, copied or linked under
the zoo's file names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from mobiserve.common import zoo
from mobiserve.common.labels import Labels
from mobiserve.server.errors import ModelLoadError
from mobiserve.server.runtime.model import Model
from mobiserve.server.runtime.session import SessionTuning

from helpers import FP32, SYNSETS, cli, free_port, require

FP32_NAME = zoo.ZOO["fp32"].filename  # the zoo's fp32 file name; its digest is not pinned


def wrong_classifier(path: Path) -> None:
    """A loadable ONNX model with the zoo's input but 3 outputs per image, not 1000."""
    image = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])
    scores = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["output"]),
    ]
    onnx.save(helper.make_model(helper.make_graph(nodes, "wrong", [image], [scores])), path)


def test_pull_refuses_a_file_that_is_not_the_fp32_model_and_repairs_one_on_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mirror, models = tmp_path / "mirror", tmp_path / "models"
    mirror.mkdir()
    pull = ("models", "pull", "fp32", "--from", str(mirror), "--dir", str(models))
    makers: list[tuple[Callable[[Path], object], str]] = [
        (lambda p: p.write_text("<html>Not Found</html>"), "not an ONNX model: protobuf cannot parse it"),
        (wrong_classifier, "expected the output float [N, 1000], found 'output' float [N, 3]"),
    ]
    for make, reason in makers:
        (mirror / FP32_NAME).unlink(missing_ok=True)
        make(mirror / FP32_NAME)
        code, out, err = cli(capsys, *pull)
        assert (code, out) == (1, "")
        assert err.splitlines() == [
            f"mobiserve: error: {FP32_NAME} from {mirror} is not the zoo's fp32 model ({reason}); not saved"
        ]
        assert not list(models.glob("*")) if models.exists() else True

    (mirror / FP32_NAME).unlink()
    (mirror / FP32_NAME).symlink_to(require(FP32))  # an fp32 MobileNetV2 with the zoo's inputs and outputs
    code, out, err = cli(capsys, *pull)
    assert code == 0, err
    assert out.startswith(f"fp32: {models / FP32_NAME} (an ONNX model with input float [N, 3, 224, 224] and output")
    assert (models / FP32_NAME).read_bytes() == FP32.read_bytes()

    (models / FP32_NAME).write_text("cut short")  # damaged on disk: a later pull fetches it again
    assert cli(capsys, *pull)[0] == 0
    assert (models / FP32_NAME).read_bytes() == FP32.read_bytes()


def test_without_network_the_message_says_where_to_copy_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    code, _, err = cli(
        capsys, "models", "pull", "int8", "--from", f"http://127.0.0.1:{free_port()}", "--dir", str(models)
    )
    assert code == 1
    assert f"Copy {zoo.DEFAULT_MODEL.filename} into {models.resolve()} by other means" in err
    assert not models.exists()


def test_a_damaged_zoo_model_says_how_to_fetch_it_again(tmp_path: Path) -> None:
    damaged = tmp_path / zoo.DEFAULT_MODEL.filename
    damaged.write_bytes(b"\0" * 4096)
    other = tmp_path / "mine.onnx"
    other.write_bytes(b"\0" * 4096)
    labels = Labels.load(require(SYNSETS))
    with pytest.raises(ModelLoadError) as e:
        Model(damaged, labels, SessionTuning(intra_op_threads=1))
    assert str(e.value).startswith(f"cannot load {damaged} with onnxruntime: ")
    assert f"`mobiserve models pull int8 --dir {tmp_path}` fetches it again" in str(e.value)
    with pytest.raises(ModelLoadError) as e:
        Model(other, labels, SessionTuning(intra_op_threads=1))
    assert "models pull" not in str(e.value)  # not a zoo file: no such advice
