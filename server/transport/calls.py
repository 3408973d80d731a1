"""What every inference RPC shares, whichever protocol carries it.

One `Calls` serves all the servicers of a server (mobiserve.v1.Classifier, the Open Inference
Protocol): one registry, one drain gate, one error log, one set of metrics. A servicer converts
its messages and hands the domain work to `answer` (one request) through `unary` (a unary call)
or `stream` (a pipelined stream); those do the rest the same way for every protocol:

- every request or stream message is counted once in `mobiserve_requests_total` with the status it
  got, and failures other than plain client mistakes are logged with its request id (throttled);
- deadlines: the client's (gRPC enforces it by cancelling the call) or the server's default;
- `drain()`, the transport's part of a graceful shutdown: each open stream stops reading, answers
  every message it has read, then ends with UNAVAILABLE so the client knows to send the rest
  elsewhere; a call that arrives afterwards is refused with UNAVAILABLE at once (`drain.py`);
- a failed request's exception becomes a value (`Failed`) and its frames are cleared, so that the
  request's payload is not kept alive by a reference cycle until a full garbage collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from mobiserve.server.errors import DeadlineExceeded, InvalidInput, Unavailable
from mobiserve.server.metrics import Metrics
from mobiserve.server.serving import Classified, ModelRegistry, Servable
from mobiserve.server.transport.drain import CallGate
from mobiserve.server.transport.errorlog import ErrorLog
from mobiserve.server.transport.status import forget_frames, is_unexpected, status_of

log = logging.getLogger(__name__)

CLOCK_SLACK_S = 0.005  # gRPC cancels at its own clock's deadline; ours may read a little earlier
ANSWER_MARGIN_S = 0.05  # a held answer goes out this long before its call's deadline at the latest
STREAM_WINDOW = 128  # requests in flight per stream; past it we stop reading (HTTP/2 flow control pushes back)
SHUTTING_DOWN = "the server is shutting down; send the request to another instance or retry shortly"
DEFAULT_LABEL = "(default)"  # metrics/log label of a request naming no model, before one is resolved
UNKNOWN_LABEL = "(unknown)"  # ... naming a model this server does not serve: labels stay a bounded set

Req = TypeVar("Req")
Resp = TypeVar("Resp")


@dataclass(frozen=True)
class Failed:
    """A request's outcome when it is not a response: the status to send, already logged and counted.

    A value, not an exception: an exception caught and re-raised up the handlers ties their frames
    (and the request payload in them) into reference cycles that only a full collection frees."""

    code: grpc.StatusCode
    message: str


class Calls:
    def __init__(self, metrics: Metrics, default_timeout_s: float, model_names: Iterable[str]):
        self.registry: ModelRegistry | None = None  # set once the models are loaded and warm
        self.metrics = metrics
        self.default_timeout_s = default_timeout_s
        self._model_names = frozenset(model_names)
        self._errors = ErrorLog(log)
        self.gate = CallGate()
        self._readers: set[asyncio.Task[None]] = set()
        self.answered = 0  # requests answered, whatever their status: a sign of work done

    @property
    def ready(self) -> bool:
        """Models loaded and warm, and not draining."""
        return self.registry is not None and not self.gate.draining

    def drain(self) -> None:
        """Start refusing new work; make every open stream stop reading and finish what it has read."""
        self.gate.drain()
        for reader in list(self._readers):
            reader.cancel()

    async def unary(
        self, context: grpc.aio.ServicerContext, handle: Callable[[float, bool, bool], Awaitable[Resp | Failed]]
    ) -> Resp:
        """One unary call: `handle(deadline, refuse, enforce_deadline)` calls `answer` once."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + (self.default_timeout_s if remaining is None else remaining)
        with self.gate.call():
            outcome = await handle(deadline, self.gate.draining, remaining is None)
            if isinstance(outcome, Failed):
                if outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED and _expired(context):
                    # gRPC is ending the call with DEADLINE_EXCEEDED itself; a status sent now
                    # would race it (and gRPC would log the lost race as an error)
                    raise asyncio.CancelledError()
                await self._until_port_closed(context)
                # Only abort() sends a trailers-only status, which clients may retry (a status
                # after headers commits the call). It raises, and gRPC keeps that exception in a
                # reference cycle with the frames it went through, gRPC's own among them, which
                # hold the request: once the call is over, those frames are cleared.
                try:
                    await context.abort(outcome.code, outcome.message)
                except BaseException as aborted:
                    context.add_done_callback(functools.partial(_forget, aborted))
                    raise
                raise AssertionError("unreachable: abort() raises")
            await self._until_port_closed(context)
            return outcome

    async def stream(
        self,
        requests: AsyncIterator[Req],
        context: grpc.aio.ServicerContext,
        handle: Callable[[Req, float], Awaitable[Resp | Failed]],
        failed: Callable[[Req, Failed], Resp],
    ) -> AsyncIterator[Resp]:
        """A pipelined stream: up to STREAM_WINDOW requests in flight, answered in completion order.

        `handle(request, deadline)` calls `answer` once (with enforce_deadline); a request that
        fails is answered with `failed(request, why)` and the stream goes on."""
        with self.gate.call():
            if self.gate.draining:
                await self._until_port_closed(context)
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            async with contextlib.aclosing(self._stream(requests, context, handle, failed)) as responses:
                async for response in responses:  # closed with this generator: tasks end at once
                    yield response

    async def answer(
        self,
        *,
        method: str,
        model: str,
        request_id: str,
        context: grpc.aio.ServicerContext,
        deadline: float,
        refuse: bool,
        enforce_deadline: bool,
        work: Callable[[Servable], Awaitable[Resp]],
        invalid: str = "",
    ) -> Resp | Failed:
        """Answer one request with `work(served model)`, or say how it failed. Counts it exactly once.

        enforce_deadline: end the request when `deadline` passes even if it is still waiting (a
        default timeout: gRPC enforces client deadlines itself, by cancelling the call).
        invalid: why the request is refused before anything else (it could not be decoded)."""
        started = time.perf_counter()
        label = self.label(model)
        code = grpc.StatusCode.OK
        try:
            if invalid:
                raise InvalidInput(invalid)
            if refuse:
                raise Unavailable(SHUTTING_DOWN)
            if self.registry is None:
                raise Unavailable("models are still loading; retry shortly")
            job = work(self.registry.get(model))
            return await (within(job, deadline) if enforce_deadline else job)
        except asyncio.CancelledError:
            # the client went away, or the call's deadline passed and gRPC cancelled it (gRPC's
            # own clock decides: ours may read a hair earlier)
            expired = _expired(context) or time.monotonic() >= deadline - CLOCK_SLACK_S
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, message = status_of(exc)
            self._errors.failed(
                code,
                message,
                model=label,
                method=method,
                request_id=request_id,
                exc=exc if is_unexpected(exc) else None,
            )
            forget_frames(exc)
        finally:
            self.metrics.observe_request(label, method, code.name, time.perf_counter() - started)
            self.answered += 1
        return Failed(code, message)

    async def _until_port_closed(self, context: grpc.aio.ServicerContext) -> None:
        """While draining, hold an answer (or the end of a stream) until GOAWAY is out, so the
        client learns this server is going before it can send its next call (drain.py)."""
        if self.gate.draining:
            remaining = context.time_remaining()
            await self.gate.port_closed(None if remaining is None else remaining - ANSWER_MARGIN_S)

    def observe(self, result: Classified) -> None:
        """A classified request's images and timing, into the metrics."""
        t = result.timing
        self.metrics.observe_result(
            result.model, len(result.scores), t.queue_us / 1e6, t.preprocess_us / 1e6, t.inference_us / 1e6
        )

    def label(self, name: str) -> str:
        """The model's name for metrics and logs, from a bounded set whatever the client sends."""
        registry = self.registry
        if not name:
            return registry.default if registry is not None else DEFAULT_LABEL
        return name if name in self._model_names else UNKNOWN_LABEL

    async def _stream(
        self,
        requests: AsyncIterator[Req],
        context: grpc.aio.ServicerContext,
        handle: Callable[[Req, float], Awaitable[Resp | Failed]],
        failed: Callable[[Req, Failed], Resp],
    ) -> AsyncGenerator[Resp, None]:
        answers: asyncio.Queue[Resp | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        handlers: set[asyncio.Task[None]] = set()

        async def answer(request: Req) -> None:
            # Each message gets the default timeout. A stream deadline ends the whole call: gRPC
            # cancels this handler then, which drops whatever the stream still has queued.
            try:
                outcome = await handle(request, time.monotonic() + self.default_timeout_s)
            finally:
                window.release()
            answers.put_nowait(failed(request, outcome) if isinstance(outcome, Failed) else outcome)

        async def read() -> None:
            iterator = aiter(requests)
            while True:
                await window.acquire()  # before reading: a message once read is always answered
                request = await anext(iterator, None)
                if request is None:
                    return
                task = asyncio.create_task(answer(request))
                handlers.add(task)
                task.add_done_callback(handler_done)

        def handler_done(task: asyncio.Task[None]) -> None:
            handlers.discard(task)
            end_if_all_answered()

        def end_if_all_answered(_: object = None) -> None:
            # the reader stopped (end of stream, broken stream or drain()) and every message it
            # read has its answer queued: exactly once, whichever of the two happens last
            if reader.done() and not handlers:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        reader.add_done_callback(end_if_all_answered)
        try:
            while (response := await answers.get()) is not None:
                yield response
            await self._until_port_closed(context)
            await asyncio.wait({reader})
            if reader.cancelled():  # only drain() cancels it while the stream is being served
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            reader.result()  # surfaces a broken request stream
        finally:
            reader.cancel()
            for task in list(handlers):
                task.cancel()


async def within(work: Awaitable[Resp], deadline: float) -> Resp:
    """`work`, or DeadlineExceeded once `deadline` (time.monotonic) passes."""
    try:
        return await asyncio.wait_for(work, deadline - time.monotonic())
    except TimeoutError:
        raise DeadlineExceeded("the deadline passed before the request could be answered; it was dropped") from None


def _forget(exc: BaseException, _: object) -> None:
    forget_frames(exc)


def _expired(context: grpc.aio.ServicerContext) -> bool:
    """The call's own (client) deadline has passed, by gRPC's clock."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0
