"""What an ONNX file declares as its inputs and outputs, read without onnx or onnxruntime.

`mobiserve models pull` runs in the thin client install too, where neither is installed, and must
still refuse a file that is not the model it asked for (an error page saved under the model's
name, a truncated download) when no sha256 is pinned. An ONNX file is a protobuf `ModelProto`;
protobuf (a dependency of every install) parses it against the few messages of onnx.proto that
say what the graph takes and gives, declared here with their field numbers. The nodes and
weights are skipped as unknown fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

FLOAT = 1  # onnx TensorProto.DataType
_TYPES = {FLOAT: "float", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 11: "double"}

_F = descriptor_pb2.FieldDescriptorProto
# message: [(field, number, type, label, message type)], from onnx/onnx.proto (IR version 3 and later)
_MESSAGES = {
    "ModelProto": [("graph", 7, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "GraphProto")],
    "GraphProto": [
        ("initializer", 5, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "TensorProto"),
        ("input", 11, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "ValueInfoProto"),
        ("output", 12, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "ValueInfoProto"),
    ],
    "TensorProto": [("name", 8, _F.TYPE_STRING, _F.LABEL_OPTIONAL, "")],
    "ValueInfoProto": [
        ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("type", 2, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "TypeProto"),
    ],
    "TypeProto": [("tensor_type", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "TensorType")],
    "TensorType": [
        ("elem_type", 1, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),
        ("shape", 2, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, "TensorShapeProto"),
    ],
    "TensorShapeProto": [("dim", 1, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, "Dimension")],
    "Dimension": [
        ("dim_value", 1, _F.TYPE_INT64, _F.LABEL_OPTIONAL, ""),
        ("dim_param", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
    ],
}


def _model_class() -> type[message.Message]:
    file = descriptor_pb2.FileDescriptorProto(
        name="mobiserve_onnx_signature.proto", package="mobiserve_onnx", syntax="proto2"
    )
    for name, fields in _MESSAGES.items():
        kind = file.message_type.add(name=name)
        for field, number, type_, label, type_name in fields:
            added = kind.field.add(name=field, number=number, type=type_, label=label)
            if type_name:
                added.type_name = f".mobiserve_onnx.{type_name}"
    pool = descriptor_pool.DescriptorPool()  # its own pool: no clash with onnx's, when that is installed too
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("mobiserve_onnx.ModelProto"))


_ModelProto = _model_class()


class NotAModel(ValueError):
    """The file is not an ONNX model, or not one with the inputs and outputs expected."""


@dataclass(frozen=True)
class Tensor:
    name: str
    type: str  # "float", "uint8", ...
    shape: tuple[int | str, ...]  # a size, or the name of a free dimension such as "batch_size"

    def __str__(self) -> str:
        return f"{self.name!r} {self.type} [{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[Tensor, ...]  # the graph's inputs that are not weights
    outputs: tuple[Tensor, ...]


def signature(path: Path) -> Signature:
    """The graph's inputs and outputs. Raises NotAModel (whose message does not repeat the path)
    for a file protobuf cannot parse as a model."""
    model = _ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except message.DecodeError:
        raise NotAModel("not an ONNX model: protobuf cannot parse it") from None
    graph = model.graph  # type: ignore[attr-defined]
    weights = {t.name for t in graph.initializer}
    inputs = tuple(_tensor(v) for v in graph.input if v.name not in weights)
    if not model.HasField("graph") or not graph.output:
        raise NotAModel("not an ONNX model: no graph with outputs")
    return Signature(inputs, tuple(_tensor(v) for v in graph.output))


def check_classifier(path: Path, size: int, classes: int) -> Signature:
    """Refuse anything but one float [N, 3, size, size] input and a float [N, classes] output
    (the first), the contract of the ImageNet models the server runs. Raises NotAModel."""
    found = signature(path)
    image = (3, size, size)
    if len(found.inputs) != 1 or found.inputs[0].type != "float" or found.inputs[0].shape[1:] != image:
        inputs = ", ".join(map(str, found.inputs)) or "none"
        raise NotAModel(f"expected one input float [N, 3, {size}, {size}], found {inputs}")
    output = found.outputs[0]
    if output.type != "float" or len(output.shape) != 2 or output.shape[1] != classes:
        raise NotAModel(f"expected the output float [N, {classes}], found {output}")
    return found


def _tensor(value: message.Message) -> Tensor:
    tensor = value.type.tensor_type  # type: ignore[attr-defined]
    dims = tuple(d.dim_param if d.HasField("dim_param") else d.dim_value for d in tensor.shape.dim)
    return Tensor(value.name, _TYPES.get(tensor.elem_type, f"type {tensor.elem_type}"), dims)  # type: ignore[attr-defined]
