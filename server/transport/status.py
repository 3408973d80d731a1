"""The one place domain errors become gRPC status codes. Pure: the servicer does the logging.

Messages are capped in length: they travel in the call's trailers, and a trailer over gRPC's
metadata limit would replace the status with RESOURCE_EXHAUSTED on the client."""

from __future__ import annotations

import traceback

import grpc

from mobiserve.server import errors

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.InferenceFailed, grpc.StatusCode.INTERNAL),
]


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) for an exception; anything unexpected is INTERNAL."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, errors.capped(str(exc))
    return grpc.StatusCode.INTERNAL, errors.capped(f"internal error: {type(exc).__name__}: {exc}")


def is_unexpected(exc: BaseException) -> bool:
    """True for a bug rather than a domain error: its traceback belongs in the log."""
    return not isinstance(exc, errors.MobiserveError)


def forget_frames(exc: BaseException) -> None:
    """Clear the locals of the finished frames an exception (and what it was raised from) still
    references, once it has become a status. Those frames hold the request's payload (the image
    bytes being decoded, the request itself); where a library keeps the exception in a reference
    cycle, only a full garbage collection, which rarely runs, would free them."""
    seen: set[int] = set()
    chain: BaseException | None = exc
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        traceback.clear_frames(chain.__traceback__)
        chain = chain.__cause__ or chain.__context__
