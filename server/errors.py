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


class ModelLoadError(MobiserveError):
    """A model file cannot be served (missing, not ONNX, wrong input or output shape)."""
