"""The card's quantization step: static post-training quantization with onnxruntime's tools.

QDQ format, int8 weights (per output channel by default) and uint8 activations, calibrated on
images preprocessed by the server's own code, so the ranges are those the served model will see.

Why these choices (fp32 stand-in, 100 calibration images, top-1 on the 415 other sample images;
docs/model-card.md has the table):
- per-channel weights lose much less top-1 than per-tensor ones: MobileNetV2's depthwise filters
  differ in range by orders of magnitude, and one scale per tensor crushes the small ones;
- uint8 activations (U8S8): onnxruntime's x86 kernels run them faster than fp32; int8
  activations (S8S8) were no faster than fp32 here;
- the scores (the ops that write the model's outputs) stay float: quantized to 256 levels they
  tie and clip among the top classes, which cost the entropy method most of its top-1.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import version_converter
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from tqdm import tqdm

from mobiserve.server.processing.normalize import assemble

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
PER_CHANNEL_OPSET = 13  # DequantizeLinear's `axis` (per-channel scales) arrived in opset 13
_QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger"})


class QuantizeError(ValueError):
    """A model or setting quantization cannot use; the message says why, on one line."""


@dataclass(frozen=True)
class QuantizeOptions:
    per_channel: bool = True
    method: str = "minmax"


def check_float_model(path: str | Path) -> None:
    """Refuse files that are not ONNX, or are quantized already."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise QuantizeError(f"model file not found: {path}") from None
    except Exception:  # protobuf's DecodeError and friends
        raise QuantizeError(f"{path} is not an ONNX model (it does not parse as an ONNX protobuf)") from None
    if not model.graph.node:
        raise QuantizeError(f"{path} is not an ONNX model (its graph is empty)")
    quantized = sorted({n.op_type for n in model.graph.node} & _QUANTIZED_OPS)
    if quantized:
        raise QuantizeError(f"{path} is quantized already (it has {', '.join(quantized)} nodes); give the fp32 model")


class _Calibration(CalibrationDataReader):
    """One preprocessed image per run, as the model input the server would build."""

    def __init__(self, input_name: str, crops: Sequence[np.ndarray], progress: tqdm):
        self._input_name = input_name
        self._crops = crops
        self._progress = progress
        self._next, self._end = 0, len(crops)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        crop = self._crops[self._next]
        self._next += 1
        self._progress.update()
        return {self._input_name: assemble([crop])}

    def __len__(self) -> int:
        return len(self._crops)

    def set_range(self, start_index: int, end_index: int) -> None:
        """onnxruntime calibrates strides [start, end) one after another."""
        self._next, self._end = start_index, min(end_index, len(self._crops))


def quantize(
    fp32_path: str | Path, input_name: str, crops: Sequence[np.ndarray], output: str | Path, options: QuantizeOptions
) -> None:
    """fp32 ONNX -> int8 QDQ ONNX at `output`, calibrated on uint8 crops from the server's preprocessing."""
    if not crops:
        raise QuantizeError("no calibration images could be read")
    with tempfile.TemporaryDirectory(prefix="mobiserve-quantize-") as tmp:
        prepared, score_ops = _prepare(fp32_path, Path(tmp), options.per_channel)
        progress = tqdm(total=len(crops), desc="calibrating", unit="img", leave=False, disable=None)
        # onnxruntime prints calibration chatter; stdout is for results
        with progress, contextlib.redirect_stdout(sys.stderr):
            quantize_static(
                str(prepared),
                str(output),
                _Calibration(input_name, crops, progress),
                quant_format=QuantFormat.QDQ,
                per_channel=options.per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=METHODS[options.method],
                extra_options=_extra_options(options.method, score_ops),
            )


def _prepare(fp32_path: str | Path, tmp: Path, per_channel: bool) -> tuple[Path, list[str]]:
    """onnxruntime's pre-processing (shape inference, graph optimisation), then opset 13 if the
    weights are to be quantized per channel and the model is older. Also returns the op types
    that compute the model's outputs: their results stay float."""
    prepared = tmp / "prepared.onnx"
    # symbolic shape inference is for dynamic-shape transformers and needs sympy; a CNN's shapes
    # are fully known to onnx's own inference, which still runs
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    model = onnx.load(str(prepared))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if per_channel and opset < PER_CHANNEL_OPSET:
        try:
            model = version_converter.convert_version(model, PER_CHANNEL_OPSET)
        except Exception as exc:
            raise QuantizeError(
                f"{fp32_path}: cannot upgrade opset {opset} to {PER_CHANNEL_OPSET} for per-channel weights "
                f"({first_line(exc)}); try --no-per-channel"
            ) from None
        onnx.save(model, str(prepared))
    outputs = {o.name for o in model.graph.output}
    return prepared, sorted({n.op_type for n in model.graph.node if outputs & set(n.output)})


def _extra_options(method: str, score_ops: list[str]) -> dict[str, object]:
    """Float scores (see the module's docstring), and a memory bound for calibration.

    MinMax reduces each activation to its range inside the calibration graph, so it is cheap in
    memory. The histogram methods keep every activation of every image until the end (gigabytes
    for 100 images, docs/model-card.md): feeding them in strides of one image keeps memory flat.
    (Without strides, onnxruntime 1.32 also wrote a model byte-identical to MinMax's here.)"""
    options: dict[str, object] = {"OpTypesToExcludeOutputQuantization": score_ops}
    if method != "minmax":
        options["CalibStridedMinMax"] = 1
    return options


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
