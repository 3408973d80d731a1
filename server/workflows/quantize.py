"""The card's quantization step: static post-training quantization with onnxruntime's tools.

QDQ format, int8 weights per output channel, uint8 activations whose ranges come from entropy
(KL-divergence) calibration, on images preprocessed by the server's own code, so the ranges are
those the served model will see.

Why these defaults (the grid in docs/model-card.md, made by scripts/quantize-grid.py, judges
options by top-1 agreement with the fp32 model on images outside the calibration set):
- the calibration method matters most: MinMax ranges reach the rare extremes of each activation
  and waste levels on them; entropy and percentile ranges clip those, agree far better and cost
  the same (entropy came first over all the held-out inputs, by a hair);
- per-channel weights: MobileNetV2's depthwise filters differ in range by orders of magnitude,
  and one scale per tensor crushes the small ones;
- uint8 activations (U8S8): onnxruntime's x86 kernels run int8 (S8S8) and symmetric activations
  much slower here, for no better agreement;
- QDQ rather than QOperator: as fast, and QOperator agreed less with clipped ranges (its fused
  ops requantize differently);
- the scores (the ops that write the model's outputs) stay float: quantized to 256 levels they
  tie and clip among the top classes, which cost the entropy method most of its top-1. Keeping
  the first convolution or the whole classifier float as well changed agreement by less than
  its noise and cost time at batch 16.
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


FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
ACTIVATIONS = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
KEEP_FLOAT = ("first-conv", "classifier")  # parts that may stay float: the model's first and last layers


@dataclass(frozen=True)
class QuantizeOptions:
    """What `quantize_static` is asked for; the defaults are the grid's choice (docs/model-card.md)."""

    per_channel: bool = True
    method: str = "entropy"  # METHODS
    format: str = "qdq"  # FORMATS
    activations: str = "u8"  # ACTIVATIONS
    symmetric_activations: bool = False
    keep_float: tuple[str, ...] = ()  # KEEP_FLOAT
    percentile: float = 99.99  # for method "percentile" (the grid: 99.95-99.99 agreed best; onnxruntime says 99.999)

    def __post_init__(self) -> None:
        for value, known, what in (
            (self.method, METHODS, "calibration method"),
            (self.format, FORMATS, "format"),
            (self.activations, ACTIVATIONS, "activation type"),
        ):
            if value not in known:
                raise QuantizeError(f"unknown {what} {value!r}; known: {', '.join(known)}")
        unknown = set(self.keep_float) - set(KEEP_FLOAT)
        if unknown:
            raise QuantizeError(f"cannot keep {', '.join(sorted(unknown))} float; known: {', '.join(KEEP_FLOAT)}")
        if not 0 < self.percentile <= 100:
            raise QuantizeError(f"percentile must be in (0, 100], got {self.percentile}")

    def describe(self) -> str:
        """One line for people: what the written model is."""
        kinds = [
            self.format.upper() if self.format == "qdq" else "QOperator",
            f"{'per-channel' if self.per_channel else 'per-tensor'} int8 weights",
            f"{'symmetric ' if self.symmetric_activations else ''}{'uint8' if self.activations == 'u8' else 'int8'} "
            "activations",
            f"{self.method}{f' {self.percentile:g}' if self.method == 'percentile' else ''} calibration",
        ]
        if self.keep_float:
            kinds.append(f"{' and '.join(self.keep_float)} kept float")
        return ", ".join(kinds)


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
        prepared, model = _prepare(fp32_path, Path(tmp), options.per_channel)
        progress = tqdm(total=len(crops), desc="calibrating", unit="img", leave=False, disable=None)
        # onnxruntime prints calibration chatter; stdout is for results
        with progress, contextlib.redirect_stdout(sys.stderr):
            quantize_static(
                str(prepared),
                str(output),
                _Calibration(input_name, crops, progress),
                quant_format=FORMATS[options.format],
                per_channel=options.per_channel,
                activation_type=ACTIVATIONS[options.activations],
                weight_type=QuantType.QInt8,
                calibrate_method=METHODS[options.method],
                nodes_to_exclude=_kept_float(model, options.keep_float),
                extra_options=_extra_options(options, _score_ops(model)),
            )


def _prepare(fp32_path: str | Path, tmp: Path, per_channel: bool) -> tuple[Path, onnx.ModelProto]:
    """onnxruntime's pre-processing (shape inference, graph optimisation), then opset 13 if the
    weights are to be quantized per channel and the model is older."""
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
    return prepared, model


def _score_ops(model: onnx.ModelProto) -> list[str]:
    """The op types that compute the model's outputs: their results stay float."""
    outputs = {o.name for o in model.graph.output}
    return sorted({n.op_type for n in model.graph.node if outputs & set(n.output)})


def _kept_float(model: onnx.ModelProto, parts: Sequence[str]) -> list[str]:
    """Names of the nodes that stay float: "first-conv" is the node reading the model's input and
    the activation right after it; "classifier" the node writing the model's output."""
    nodes = list(model.graph.node)
    inputs = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    names: list[str] = []
    if "first-conv" in parts:
        first = [n for n in nodes if inputs & set(n.input)]
        produced = {o for n in first for o in n.output}
        first += [n for n in nodes if n.op_type in ("Clip", "Relu") and produced & set(n.input)]
        names += [n.name for n in first]
    if "classifier" in parts:
        names += [n.name for n in nodes if outputs & set(n.output)]
    if any(not name for name in names):
        raise QuantizeError("the model's nodes have no names, so none can be kept float")
    return names


def _extra_options(options: QuantizeOptions, score_ops: list[str]) -> dict[str, object]:
    """Float scores (see the module's docstring), and a memory bound for calibration.

    MinMax reduces each activation to its range inside the calibration graph, so it is cheap in
    memory. The histogram methods keep every activation of every image until the end (gigabytes
    for 100 images, docs/model-card.md): feeding them in strides of one image keeps memory flat.
    (Without strides, onnxruntime 1.32 also wrote a model byte-identical to MinMax's here.)"""
    extra: dict[str, object] = {
        "OpTypesToExcludeOutputQuantization": score_ops,
        "ActivationSymmetric": options.symmetric_activations,
    }
    if options.method != "minmax":
        extra["CalibStridedMinMax"] = 1
    if options.method == "percentile":
        extra["CalibPercentile"] = options.percentile
    return extra


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
