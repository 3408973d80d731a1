"""Request messages that protobuf cannot parse are an answer, not an exception.

gRPC deserializes a request before the servicer sees it; a message that fails (a string field
that is not valid UTF-8, a corrupt wire format) would raise inside gRPC: `UNKNOWN`, an ERROR with
a traceback per request, nothing counted, and in a stream the end of the whole stream. Here the
parse failure becomes an `Undecodable` value, answered like any bad request: `INVALID_ARGUMENT`
(counted and logged within the throttle, for inference: `calls.py`; `status.with_status` for
the other methods), and a stream goes on with its next message. Its message says what is wrong
(protobuf's own says only that parsing failed): the field that is not UTF-8, by its path (`id`,
`inputs[0].name`), or a corrupt wire format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

from google.protobuf import empty_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

M = TypeVar("M", bound=Message)

_LENGTH_DELIMITED = 2
_MAX_DEPTH = 8  # nested messages searched for the string that is not UTF-8 (the protocols nest 3 deep)


@dataclass(frozen=True)
class Undecodable:
    """A request protobuf could not parse. Holds no part of the payload, only what the answer needs.

    `model` and `request_id` are recovered best-effort from the raw fields (invalid UTF-8 replaced),
    so a stream's error answer can still name the request."""

    reason: str
    model: str = ""
    request_id: str = ""


def lenient(message_type: type[M], model_field: int = 1, id_field: int = 4) -> Callable[[bytes], M | Undecodable]:
    """A request deserializer for gRPC that returns Undecodable instead of raising.
    `model_field`, `id_field`: the numbers of the message's top-level model name and request id
    (ClassifyRequest's by default), recovered from a message that failed."""
    descriptor = cast(Descriptor, message_type.DESCRIPTOR)  # (typed as either of protobuf's implementations)

    def parse(data: bytes) -> M | Undecodable:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return _undecodable(data, descriptor, model_field, id_field)

    return parse


def _undecodable(data: bytes, descriptor: Descriptor, model_field: int, id_field: int) -> Undecodable:
    # protobuf's error says only that the message could not be parsed, whatever the reason
    name = descriptor.name
    try:
        raw = _fields(data)
        field = _not_utf8(raw, descriptor)
    except DecodeError:  # not even the wire format holds: nothing to recover
        return Undecodable(f"the request is not a valid {name} message (corrupt protobuf wire format)")
    if field:
        reason = (
            f"the request is not a valid {name}: its field {field} is not valid UTF-8 (as protobuf strings must be)"
        )
    else:
        reason = f"the request is not a valid {name} message"
    recovered = {number: data.decode("utf-8", "replace") for number, data in raw if number in (model_field, id_field)}
    return Undecodable(reason, recovered.get(model_field, ""), recovered.get(id_field, ""))


def _fields(data: bytes) -> list[tuple[int, bytes]]:
    """A message's length-delimited fields (number, bytes) as the wire format has them, before any
    check of their contents. Raises DecodeError."""
    raw = UnknownFieldSet(empty_pb2.Empty.FromString(data))
    fields = (raw[i] for i in range(len(raw)))
    return [(f.field_number, bytes(f.data)) for f in fields if f.wire_type == _LENGTH_DELIMITED]


def _not_utf8(raw: list[tuple[int, bytes]], descriptor: Descriptor, depth: int = 0) -> str:
    """The first string field that is not UTF-8, as a path (`inputs[0].name`), or ""."""
    seen: dict[int, int] = {}
    for number, data in raw:
        field = descriptor.fields_by_number.get(number)
        if field is None:
            continue
        index = seen[number] = seen.get(number, -1) + 1
        path = f"{field.name}[{index}]" if field.is_repeated else field.name
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                return path
        elif field.message_type is not None and depth < _MAX_DEPTH:
            if inner := _not_utf8(_fields(data), field.message_type, depth + 1):
                return f"{path}.{inner}"
    return ""
