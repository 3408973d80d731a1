"""Open Inference Protocol tensors <-> the domain layer's inputs and scores.

Each face of a model (names.py) takes one input, batch dimension first: the network its own
(`input`, FP32 [-1, 3, 224, 224], already preprocessed), the image face `encoded_image` (BYTES
[-1, 1]: one encoded image per element, preprocessed by the server as Classify does). Data comes in `raw_input_contents`
(what tritonclient sends) or in the typed `contents`. The one output, `output` (FP32
[-1, num_classes], the model's raw scores), goes back in `raw_output_contents`; asked for with the
`classification` parameter = k it is instead k BYTES strings "score:index:label" per image, most
probable first (the protocol's classification extension, scores being the output's values).
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mobiserve.inference import grpc_service_pb2 as pb
from mobiserve.server.errors import InvalidInput, shown
from mobiserve.server.serving import ImageInput, ImageScores, ModelDescription, RawTensor
from mobiserve.server.transport.oip.names import Face, image_name
from mobiserve.server.transport.sizes import ERROR_BYTES, FIELD, MAX_ID_BYTES, NUMBER, longest_labels

ENCODED_INPUT = "encoded_image"
CLASSIFICATION = "classification"
FP32, BYTES = "FP32", "BYTES"
_DATATYPES = {"float32": FP32, "uint8": "UINT8"}  # the domain's dtype names -> the protocol's
_LENGTH = struct.Struct("<I")  # a BYTES element's length prefix


@dataclass(frozen=True)
class Tensor:
    """A tensor's metadata as the protocol states it."""

    name: str
    datatype: str
    shape: tuple[int, ...]  # batch dimension first, -1


def input_tensor(d: ModelDescription, image: bool) -> Tensor:
    """The one input of the network (`image` False) or of its image face."""
    return (
        Tensor(ENCODED_INPUT, BYTES, (-1, 1))
        if image
        else Tensor(d.input_name, datatype_of(d.input_dtype), d.input_shape)
    )


def output_tensors(d: ModelDescription) -> list[Tensor]:
    return [Tensor(d.output_name, FP32, (-1, d.num_classes))]


def datatype_of(dtype: str) -> str:
    return _DATATYPES.get(dtype, dtype.upper())


@dataclass(frozen=True)
class Requested:
    """An output the request asked for: classes > 0 asks for that many classifications."""

    name: str
    classes: int = 0


def images_of(request: pb.ModelInferRequest, d: ModelDescription, face: Face) -> list[ImageInput]:
    """The request's images, one per batch element, checked against the face's input."""
    if not request.inputs:
        raise InvalidInput(f"request has no inputs; give {_expected(d, face)}")
    if len(request.inputs) > 1:
        names = ", ".join(repr(t.name) for t in request.inputs)
        raise InvalidInput(f"request has {len(request.inputs)} inputs ({names}); give one: {_expected(d, face)}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    tensor = request.inputs[0]
    if raw and tensor.HasField("contents"):
        raise InvalidInput(f"input {tensor.name!r} has both contents and raw_input_contents; give one")
    data = raw[0] if raw else None
    if tensor.name == input_tensor(d, face.image).name:
        return _encoded(tensor, data) if face.image else _preprocessed(tensor, data, d)
    hint = ""
    if tensor.name == input_tensor(d, not face.image).name:  # the other face's input
        hint = f"; {tensor.name!r} is the input of the model {d.name if face.image else image_name(d.name)!r}"
    raise InvalidInput(f"model {face.name!r} has no input {tensor.name!r}; give {_expected(d, face)}{hint}")


def requested_outputs(request: pb.ModelInferRequest, d: ModelDescription, face: Face) -> list[Requested]:
    """What to answer with: every output when the request names none."""
    if not request.outputs:
        return [Requested(d.output_name)]
    # each output at most once: the answer's size (and the work of building it) stays bounded by the model's
    name, times = Counter(output.name for output in request.outputs).most_common(1)[0]
    if times > 1:
        raise InvalidInput(f"output {shown(name)} is asked for {times} times; ask for each output once")
    requested = []
    for output in request.outputs:
        if output.name != d.output_name:
            raise InvalidInput(f"model {face.name!r} has no output {output.name!r}; its output is {d.output_name!r}")
        classes = 0
        if CLASSIFICATION in output.parameters:
            classes = integer_parameter(output.parameters[CLASSIFICATION], CLASSIFICATION)
            if not 1 <= classes <= d.num_classes:
                raise InvalidInput(f"{CLASSIFICATION} is {classes}; the model has {d.num_classes} classes")
        requested.append(Requested(output.name, classes))
    return requested


def integer_parameter(value: pb.InferParameter, name: str) -> int:
    kind = value.WhichOneof("parameter_choice")
    if kind == "int64_param":
        return value.int64_param
    if kind == "uint64_param":
        return value.uint64_param
    raise InvalidInput(f"parameter {name!r} must be an integer, got {kind or 'no value'}")


def response_of(
    request_id: str,
    d: ModelDescription,
    face: Face,
    scores: Sequence[ImageScores],
    requested: Sequence[Requested],
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=face.name or d.name, model_version=d.version, id=request_id)
    for want in requested:
        if want.classes:
            shape: list[int] = [len(scores), want.classes]
            datatype, raw = BYTES, _classifications(scores, want.classes, d)
        else:
            shape = [len(scores), d.num_classes]
            datatype, raw = FP32, np.stack([s.logits for s in scores]).astype("<f4", copy=False).tobytes()
        response.outputs.add(name=want.name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(raw)
    return response


def _classifications(scores: Sequence[ImageScores], k: int, d: ModelDescription) -> bytes:
    names = d.labels.names
    elements = (f"{float(s.logits[i]):f}:{int(i)}:{names[i]}".encode() for s in scores for i in s.order[:k])
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def _expected(d: ModelDescription, face: Face) -> str:
    t = input_tensor(d, face.image)
    return f"{t.name!r} ({t.datatype} {list(t.shape)})"


def _preprocessed(
    tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None, d: ModelDescription
) -> list[ImageInput]:
    want = Tensor(d.input_name, datatype_of(d.input_dtype), d.input_shape)
    shape = tuple(tensor.shape)
    if tensor.datatype != want.datatype:
        raise InvalidInput(f"input {want.name!r} is {want.datatype}, got {tensor.datatype or 'no datatype'}")
    if len(shape) != len(want.shape) or shape[0] < 1 or shape[1:] != want.shape[1:]:
        raise InvalidInput(f"input {want.name!r} has shape {list(shape)}; the model takes {list(want.shape)}")
    if raw is None:
        raw = np.asarray(tensor.contents.fp32_contents, dtype="<f4").tobytes()
    count, item = shape[0], shape[1:]
    size = int(np.prod(item)) * 4  # bytes per image
    expected = count * size
    if len(raw) != expected:
        raise InvalidInput(f"input {want.name!r} of shape {list(shape)} needs {expected} bytes of FP32, got {len(raw)}")
    return [RawTensor(item, d.input_dtype, raw[i * size : (i + 1) * size]) for i in range(count)]


def _encoded(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> list[ImageInput]:
    shape = tuple(tensor.shape)
    if tensor.datatype != BYTES:
        raise InvalidInput(f"input {ENCODED_INPUT!r} is BYTES, got {tensor.datatype or 'no datatype'}")
    if len(shape) not in (1, 2) or shape[0] < 1 or any(n != 1 for n in shape[1:]):
        raise InvalidInput(f"input {ENCODED_INPUT!r} has shape {list(shape)}; the model takes [-1, 1] (or [-1])")
    images = list(tensor.contents.bytes_contents) if raw is None else _elements(raw)
    if len(images) != shape[0]:
        raise InvalidInput(f"input {ENCODED_INPUT!r} of shape {list(shape)} needs {shape[0]} images, got {len(images)}")
    return list(images)


def _elements(raw: bytes) -> list[bytes]:
    """A raw BYTES tensor: each element as a 4-byte little-endian length, then its bytes."""
    elements: list[bytes] = []
    at, view = 0, memoryview(raw)
    while at < len(raw):
        if at + _LENGTH.size > len(raw):
            raise InvalidInput(f"BYTES element {len(elements)}: truncated length prefix")
        (n,) = _LENGTH.unpack_from(view, at)
        at += _LENGTH.size
        if at + n > len(raw):
            raise InvalidInput(f"BYTES element {len(elements)}: {n} bytes announced, {len(raw) - at} left")
        elements.append(bytes(view[at : at + n]))
        at += n
    return elements


def answer_bytes(d: ModelDescription, face: Face, images: int, requested: Sequence[Requested]) -> int:
    """At most how big the answer to a request for `images` and `requested` is (transport/sizes.py),
    in a stream too (its wrapper and error message included)."""
    _, name = longest_labels(d.labels)
    # "score:index:label": a float32 printed with "%f" is at most 47 characters
    element = _LENGTH.size + 47 + 1 + len(str(d.num_classes)) + 1 + name
    total = 4 * FIELD + len((face.name or d.name).encode()) + len(d.version.encode()) + MAX_ID_BYTES + ERROR_BYTES
    for want in requested:
        total += 4 * FIELD + len(want.name.encode()) + len(BYTES) + 2 * NUMBER  # the output's metadata
        total += FIELD + images * (want.classes * element if want.classes else d.num_classes * 4)
    return total
