"""Domain errors. The transport maps each to one gRPC status (`transport/status.py`)."""

from __future__ import annotations


class MobiserveError(Exception):
    """Base: the message is meant for the caller, so it says what to do about it."""


class InvalidInput(MobiserveError, ValueError):
    """The request itself is wrong (INVALID_ARGUMENT)."""


class ModelNotFound(MobiserveError, LookupError):
    """No model of that name (NOT_FOUND)."""


class Overloaded(MobiserveError):
    """The model's queue is full; retry later or elsewhere (RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(MobiserveError):
    """The caller's deadline passed before the work could start (DEADLINE_EXCEEDED)."""


class Unavailable(MobiserveError):
    """Not taking work now: models still loading, or the server is draining (UNAVAILABLE)."""


class InferenceFailed(MobiserveError):
    """onnxruntime failed on a batch; only that batch's requests fail (INTERNAL)."""


class AnswerTooLarge(MobiserveError):
    """A built answer over the send limit: its request fails alone (INTERNAL). Requests are checked
    against a bound of their answer's size first (transport/sizes.py), so this is a wrong bound."""


class ModelLoadError(MobiserveError):
    """A model file cannot be served (missing, not ONNX, wrong input or output shape)."""


SHOWN_CHARS = 64  # of a client's value quoted in a message
MAX_MESSAGE_CHARS = 512  # of any status message: it travels in a trailer, whose size gRPC limits


def shown(value: str | bytes | list[int] | tuple[int, ...]) -> str:
    """A client-supplied value as a message may quote it: its repr, cut to SHOWN_CHARS, saying how
    long it really was. A 16 KiB model name echoed whole would make the status itself too large."""
    text = repr(list(value) if isinstance(value, tuple) else value)
    if len(text) <= SHOWN_CHARS:
        return text
    unit = "values" if isinstance(value, list | tuple) else "characters" if isinstance(value, str) else "bytes"
    return f"{text[: SHOWN_CHARS - 3]}... ({len(value)} {unit})"


def capped(message: str) -> str:
    """A status message no longer than MAX_MESSAGE_CHARS, whatever went into it."""
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 3] + "..."
