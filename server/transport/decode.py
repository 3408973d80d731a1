"""Request messages that protobuf cannot parse are an answer, not an exception.

gRPC deserializes a request before the servicer sees it; a message that fails (a string field
that is not valid UTF-8, a corrupt wire format) would raise inside gRPC: `UNKNOWN`, an ERROR with
a traceback per request, nothing counted, and in a stream the end of the whole stream. Here the
parse failure becomes an `Undecodable` value, answered like any bad request: `INVALID_ARGUMENT`
(counted and logged within the throttle, for inference: `calls.py`; `status.with_status` for
the other methods), and a stream goes on with its next message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

M = TypeVar("M", bound=Message)

_LENGTH_DELIMITED = 2


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
    name = message_type.DESCRIPTOR.name

    def parse(data: bytes) -> M | Undecodable:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return _undecodable(data, str(exc), name, model_field, id_field)

    return parse


def _undecodable(data: bytes, error: str, name: str, model_field: int, id_field: int) -> Undecodable:
    if "UTF-8" in error:
        reason = f"the request is not a valid {name}: a string field (a model name, an id, a type) is not UTF-8"
    else:
        reason = f"the request is not a valid {name} message (corrupt protobuf wire format)"
    fields: dict[int, str] = {}
    try:
        raw = UnknownFieldSet(empty_pb2.Empty.FromString(data))
        for field in (raw[i] for i in range(len(raw))):
            if field.field_number in (model_field, id_field) and field.wire_type == _LENGTH_DELIMITED:
                fields[field.field_number] = bytes(field.data).decode("utf-8", "replace")
    except DecodeError:
        pass  # not even the wire format holds: nothing to recover
    return Undecodable(reason, fields.get(model_field, ""), fields.get(id_field, ""))
