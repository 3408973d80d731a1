"""The client's exceptions, and the one place gRPC failures become them.

Every exception keeps the gRPC status code and the server's own message, so nothing the server
said is lost; the class only adds what a caller can act on (fix the image, pick another model,
back off, raise the deadline).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import grpc


class MobiserveError(Exception):
    """A call failed. `code` is the gRPC status, `message` the server's (or gRPC's) explanation.

    `input_index` is set by `classify_many`: the position of the failing image in its input.
    """

    def __init__(self, code: grpc.StatusCode, message: str, input_index: int | None = None):
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.input_index = input_index

    def __str__(self) -> str:
        where = "" if self.input_index is None else f"input {self.input_index}: "
        return f"{where}{self.message} ({self.code.name})"


class InvalidArgument(MobiserveError):
    """The request was refused as malformed (INVALID_ARGUMENT), e.g. top_k over the class count."""


class InvalidImage(InvalidArgument):
    """An image could not be decoded or is not an acceptable tensor (INVALID_ARGUMENT)."""


class ModelNotFound(MobiserveError):
    """The server serves no model of that name (NOT_FOUND); the message lists those it has."""


class Overloaded(MobiserveError):
    """The model's queue is full (RESOURCE_EXHAUSTED): back off, or send elsewhere."""


class DeadlineExceeded(MobiserveError):
    """The call's deadline passed before the answer came (DEADLINE_EXCEEDED)."""


class Unavailable(MobiserveError):
    """No server took the call (UNAVAILABLE): unreachable, still loading, or draining."""


class Cancelled(MobiserveError):
    """The call was cancelled (CANCELLED)."""


class ServerError(MobiserveError):
    """The server failed while answering (INTERNAL, UNKNOWN)."""


_BY_CODE: dict[grpc.StatusCode, type[MobiserveError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: ServerError,
    grpc.StatusCode.UNKNOWN: ServerError,
}
_CODE_OF_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
# The server names the failing image first ("image 3: corrupt or truncated JPEG ...").
_IMAGE_MESSAGE = re.compile(r"^image \d+: ")


def error_of(code: grpc.StatusCode, message: str, input_index: int | None = None) -> MobiserveError:
    """The exception for a status code and message."""
    kind = _BY_CODE.get(code, MobiserveError)
    if kind is InvalidArgument and _IMAGE_MESSAGE.match(message):
        kind = InvalidImage
    return kind(code, message, input_index)


def error_of_number(code: int, message: str, input_index: int | None = None) -> MobiserveError:
    """The exception for a status carried as a number (ClassifyStream's per-request `error`)."""
    return error_of(_CODE_OF_NUMBER.get(code, grpc.StatusCode.UNKNOWN), message, input_index)


@contextmanager
def translated() -> Iterator[None]:
    """Turn a grpc.RpcError raised inside the block into the library's exception.

    `from None`: the RpcError adds nothing the new exception does not carry, only noise.
    """
    try:
        yield
    except grpc.RpcError as exc:
        raise error_of(exc.code(), exc.details() or "") from None  # every RpcError from a call is also a Call
