"""The one place domain errors become gRPC statuses: the table, and how a handler ends with one.

Messages are capped in length: they travel in the call's trailers, and a trailer over gRPC's
metadata limit would replace the status with RESOURCE_EXHAUSTED on the client."""

from __future__ import annotations

import functools
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from mobiserve.server import errors
from mobiserve.server.transport.decode import Undecodable

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.InferenceFailed, grpc.StatusCode.INTERNAL),
    (errors.AnswerTooLarge, grpc.StatusCode.INTERNAL),
]

S = TypeVar("S")  # a servicer
Q = TypeVar("Q")  # its request message
R = TypeVar("R")  # its response message


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message) for an exception; anything unexpected is INTERNAL."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, errors.capped(str(exc))
    return grpc.StatusCode.INTERNAL, errors.capped(f"internal error: {type(exc).__name__}: {exc}")


def is_unexpected(exc: BaseException) -> bool:
    """True for a bug rather than a domain error: its traceback belongs in the log."""
    return not isinstance(exc, errors.MobiserveError)


async def abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with this status. Only abort() sends a trailers-only status, which clients may
    retry (a status after headers commits the call). It raises, and gRPC keeps that exception in a
    reference cycle with the frames it went through, gRPC's own among them, which hold the request:
    once the call is over, those frames are cleared."""
    try:
        await context.abort(code, message)
    except BaseException as aborted:
        context.add_done_callback(functools.partial(_forget, aborted))
        raise
    raise AssertionError("grpc's abort() returned instead of raising")


def with_status(
    method: Callable[[S, Q, grpc.aio.ServicerContext], Awaitable[R]],
) -> Callable[[S, Q | Undecodable, grpc.aio.ServicerContext], Awaitable[R]]:
    """A plain unary method (ListModels, the inference service's metadata methods): a request that
    could not be decoded, or a domain error the method raises, ends the call with its status.
    (Inference requests are answered, counted and logged by the shared handling, `calls.py`.)"""

    @functools.wraps(method)
    async def answered(servicer: S, request: Q | Undecodable, context: grpc.aio.ServicerContext) -> R:
        if isinstance(request, Undecodable):
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        try:
            return await method(servicer, request, context)
        except errors.MobiserveError as exc:
            code, message = status_of(exc)
            forget_frames(exc)
        await abort(context, code, message)  # outside the handler: the status does not chain `exc`

    return answered


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


def _forget(exc: BaseException, _: Any) -> None:
    forget_frames(exc)
