"""What every inference RPC shares, whichever protocol carries it.

A servicer converts: it describes each request as a `Call` and hands it, with the work to do on
the served model, to the server's one `CallHandling` (`unary` for a unary call, `stream` for a
pipelined stream); the work converts the message to the domain's inputs, calls `classify` and
converts the result back. The handling does the rest the same way for every protocol (one
registry, drain gate, error log and set of metrics serves mobiserve.v1.Classifier and the Open
Inference Protocol alike):

- the deadline: the client's (gRPC enforces it by cancelling the call) or the server's default,
  or the request's own limit if that comes first (the Open Inference Protocol's `timeout`); the
  work is dropped once it passes, wherever it is;
- the request id: the message's, or else the call's `x-request-id` metadata;
- every request or stream message is counted once in `mobiserve_requests_total` with the status it
  got, and failures other than plain client mistakes are logged with its request id (throttled);
- refusals before any work: a message that could not be decoded or whose parameters are wrong,
  models still loading, a server draining;
- the lane: the request's priority, else its RPC's default (serving.lane_of); a stream's message
  in a full bulk lane waits for room, and the stream is not read meanwhile;
- `drain()`, the transport's part of a graceful shutdown: each open stream stops reading, answers
  every message it has read, then ends with UNAVAILABLE so the client knows to send the rest
  elsewhere; a call that arrives afterwards is refused with UNAVAILABLE at once (`drain.py`);
- a failed request's exception becomes a value (`Failed`) and its frames are cleared, so that the
  request's payload is not kept alive by a reference cycle until a full garbage collection; its
  status is sent the one way statuses are (`status.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc
from google.protobuf.message import Message

from mobiserve.server import threads
from mobiserve.server.errors import AnswerTooLarge, DeadlineExceeded, InvalidInput, MobiserveError, Unavailable
from mobiserve.server.metrics import Metrics
from mobiserve.server.serving import BULK, Classified, ImageInput, ModelRegistry, Servable, lane_of
from mobiserve.server.transport.decode import Undecodable
from mobiserve.server.transport.drain import CallGate
from mobiserve.server.transport.errorlog import ErrorLog
from mobiserve.server.transport.sizes import check_id, echoed
from mobiserve.server.transport.status import abort, forget_frames, is_unexpected, status_of

log = logging.getLogger(__name__)

CLOCK_SLACK_S = 0.005  # gRPC cancels at its own clock's deadline; ours may read a little earlier
ANSWER_MARGIN_S = 0.05  # a held answer goes out this long before its call's deadline at the latest
STREAM_WINDOW = 128  # messages read whose answers are not sent yet, per stream; past it the stream stops reading
REQUEST_ID_HEADER = "x-request-id"  # call metadata naming the request, for messages that carry no id
SHUTTING_DOWN = "the server is shutting down; send the request to another instance or retry shortly"
MODELS_LOADING = "the models are still loading; retry shortly"
DEFAULT_LABEL = "(default)"  # metrics/log label of a request naming no model, before one is resolved
UNKNOWN_LABEL = "(unknown)"  # ... naming a model this server does not serve: labels stay a bounded set
UNREAD = "(unread)"  # ... of a call that ended before its message arrived
NO_MESSAGE = "the call carried no request message"
INLINE_ANSWER_BYTES = 64 << 10  # an answer that may be bigger is built and serialized off the event loop

Req = TypeVar("Req")  # a decoded request message


@dataclass(kw_only=True, slots=True)
class Call:
    """One inference request on its way through the handling, whatever protocol carried it.

    The servicer fills in what the message says; the handling completes the rest in place
    (`deadline`, and `request_id` from the metadata when the message has none) before the work
    sees it, which only reads it. A new per-request setting is a new field with a default."""

    method: str  # the RPC, for metrics and logs: "Classify", "ModelStreamInfer"
    model: str  # as the client named it; "" is the default model
    request_id: str = ""
    timeout_s: float = 0.0  # the request's own time limit (the Open Inference Protocol's `timeout`); 0: none
    invalid: str = ""  # why the request is refused before anything else (a parameter it got wrong)
    priority: int = 0  # the priority level asked for, 1 the most urgent (0: the default; serving.lane_of)
    deadline: float = math.inf  # time.monotonic(); set by the handling
    enforce_deadline: bool = False  # the handling ends the request at `deadline` (gRPC does at the client's own)
    streaming: bool = False  # a stream's message; set by the handling
    lane: str = ""  # the lane that serves it; set by the handling once the model is known


# The domain work of one request: decoded message, the model it names, its completed Call -> the
# serialized response (`CallHandling.serialized` builds it, off the event loop when it is big).
Work = Callable[[Req, Servable, Call], Awaitable[bytes]]


@dataclass(frozen=True)
class Failed:
    """A request's outcome when it is not a response: the status to send, already logged and counted.

    A value, not an exception: an exception caught and re-raised up the handlers ties their frames
    (and the request payload in them) into reference cycles that only a full collection frees."""

    code: grpc.StatusCode
    message: str


class CallHandling:
    def __init__(
        self, metrics: Metrics, default_timeout_s: float, model_names: Iterable[str], max_message_bytes: int = 64 << 20
    ):
        self.registry: ModelRegistry | None = None  # set once the models are loaded and warm
        self.metrics = metrics
        self.default_timeout_s = default_timeout_s
        self.max_message_bytes = max_message_bytes  # gRPC's send limit: no answer may be bigger
        # One thread builds the big answers, one at a time: it holds the GIL while it works, and
        # the event loop gets it back within a switch interval (5 ms) from one thread, not from many.
        self._answers = ThreadPoolExecutor(1, thread_name_prefix="answers", initializer=threads.name_current)
        self._model_names = frozenset(model_names)
        self._errors = ErrorLog(log)
        self.gate = CallGate()
        self._readers: set[asyncio.Task[None]] = set()
        self.answered = 0  # requests answered, whatever their status: a sign of work done

    @property
    def ready(self) -> bool:
        """Models loaded and warm, and not draining."""
        return self.registry is not None and not self.gate.draining

    def models(self) -> ModelRegistry:
        """The served models; Unavailable while they are still loading."""
        if self.registry is None:
            raise Unavailable(MODELS_LOADING)
        return self.registry

    def drain(self) -> None:
        """Start refusing new work; make every open stream stop reading and finish what it has read."""
        self.gate.drain()
        for reader in list(self._readers):
            reader.cancel()

    async def unary(
        self,
        context: grpc.aio.ServicerContext,
        requests: AsyncIterator[Req | Undecodable],
        method: str,
        call_of: Callable[[Req | Undecodable], Call],
        work: Work[Req],
    ) -> bytes:
        """One unary call: `work` answers its message, or its status ends the call.

        The method is registered as client-streaming (the same frames on the wire), so that this
        runs as soon as the call arrives, before its message: a call that ends while its message
        is still arriving is counted here too (as a unary method, gRPC would end it unseen)."""
        with self.gate.call():
            refuse = self.gate.draining
            started = time.perf_counter()
            arrival = Call(method=method, model=UNREAD)
            self._complete(arrival, context.time_remaining(), _request_id_of(context))
            request = await self._receive(requests, arrival, context, started)
            if isinstance(request, Failed):
                outcome: bytes | Failed = request
            else:
                call = call_of(request)
                self._complete(call, context.time_remaining(), call.request_id or arrival.request_id)
                outcome = await self._answer(request, call, work, context, refuse=refuse, started=started)
            if isinstance(outcome, Failed):
                if outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED and _expired(context):
                    # gRPC is ending the call with DEADLINE_EXCEEDED itself; a status sent now
                    # would race it (and gRPC would log the lost race as an error)
                    raise asyncio.CancelledError()
                await self._until_port_closed(context)
                await abort(context, outcome.code, outcome.message)
            await self._until_port_closed(context)
            return outcome

    async def stream(
        self,
        requests: AsyncIterator[Req | Undecodable],
        context: grpc.aio.ServicerContext,
        call_of: Callable[[Req | Undecodable], Call],
        work: Work[Req],
        failed: Callable[[Req | Undecodable, Call, Failed], Message],
    ) -> AsyncIterator[bytes]:
        """A pipelined stream: up to STREAM_WINDOW messages in flight, answered in completion order.

        Each message is described by `call_of` and answered by `work`; one that fails is answered
        with `failed(message, call, why)` and the stream goes on."""
        with self.gate.call():
            if self.gate.draining:
                await self._until_port_closed(context)
                await abort(context, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            stream = _Stream(self, requests, context, call_of, work, failed)
            async with contextlib.aclosing(stream.responses()) as responses:
                async for response in responses:  # closed with this generator: tasks end at once
                    yield response

    async def classify(self, model: Servable, images: Sequence[ImageInput], call: Call) -> Classified:
        """The model's answer to the call's images, in the call's lane, by the call's deadline;
        into the metrics. A stream's bulk message waits for room in a full lane (and its stream
        is not read meanwhile); anything else in a full lane is refused (RESOURCE_EXHAUSTED)."""
        call.lane = lane_of(model.description, call.priority, call.streaming)
        result = await model.classify(images, call.deadline, call.lane, call.streaming and call.lane == BULK)
        t = result.timing
        self.metrics.observe_result(
            result.model, len(result.scores), t.queue_us / 1e6, t.preprocess_us / 1e6, t.inference_us / 1e6
        )
        return result

    async def serialized(self, build: Callable[[], Message], size: int) -> bytes:
        """The answer `build()` makes, serialized; `size`: at most how big it can be (sizes.py).
        A big one is built off the event loop (256 images with 1,000 classes each: 0.4 s of
        Python), and one over the send limit fails its request alone, not the call or stream."""
        if size <= INLINE_ANSWER_BYTES:
            data = build().SerializeToString()
        else:
            loop = asyncio.get_running_loop()
            data = await loop.run_in_executor(self._answers, lambda: build().SerializeToString())
        if len(data) > self.max_message_bytes:
            raise AnswerTooLarge(
                f"the answer is {len(data)} bytes, over the {self.max_message_bytes} bytes message limit"
            )
        return data

    def close(self) -> None:
        self._answers.shutdown(wait=False, cancel_futures=True)

    def bulk_model(self, call: Call) -> Servable | None:
        """The model whose bulk lane a stream's message is bound for, known as it is read (None: it
        goes elsewhere, or will be refused): what the stream's reader waits on before the next."""
        registry = self.registry
        if registry is None or call.invalid:
            return None
        try:
            model = registry.get(call.model)
            d = model.description
            level = call.priority if call.priority <= d.priority_levels else 0  # as the inference service reads it
            return model if lane_of(d, level, streaming=True) == BULK else None
        except MobiserveError:
            return None

    def label(self, name: str) -> str:
        """The model's name for metrics and logs, from a bounded set whatever the client sends."""
        registry = self.registry
        if not name:
            return registry.default if registry is not None else DEFAULT_LABEL
        return name if name in self._model_names else UNKNOWN_LABEL

    def _complete(self, call: Call, remaining: float | None, request_id: str) -> None:
        """Give `call` its request id and its deadline, from `remaining` (the client's, in seconds
        from now; None: the server's default) or the request's own timeout if that comes first."""
        now = time.monotonic()
        if remaining is None:
            deadline, enforce = now + self.default_timeout_s, True
        else:
            deadline, enforce = now + remaining, False
        if call.timeout_s and now + call.timeout_s < deadline:
            deadline, enforce = now + call.timeout_s, True
        call.request_id, call.deadline, call.enforce_deadline = request_id, deadline, enforce

    async def _receive(
        self, requests: AsyncIterator[Req | Undecodable], call: Call, context: grpc.aio.ServicerContext, started: float
    ) -> Req | Undecodable | Failed:
        """A unary call's one message, by the call's deadline; a call that ends first is counted."""
        try:
            read = anext(aiter(requests), None)
            request = await (within(read, call.deadline) if call.enforce_deadline else read)
        except asyncio.CancelledError:
            self._count(UNREAD, call.method, _ended(context, call), started)
            raise
        except DeadlineExceeded as exc:
            failed = Failed(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        else:
            if request is not None:
                return request
            failed = Failed(grpc.StatusCode.INVALID_ARGUMENT, NO_MESSAGE)
        self._count(UNREAD, call.method, failed.code, started)
        return failed

    async def _answer(
        self,
        request: Req | Undecodable,
        call: Call,
        work: Work[Req],
        context: grpc.aio.ServicerContext,
        *,
        refuse: bool,
        started: float | None = None,
    ) -> bytes | Failed:
        """Answer one request with `work`, or say how it failed. Counts it exactly once.

        refuse: the call arrived while the server was draining. started: when it arrived."""
        started = time.perf_counter() if started is None else started
        label = self.label(call.model)
        code = grpc.StatusCode.OK
        try:
            if isinstance(request, Undecodable):
                raise InvalidInput(request.reason)
            check_id(call.request_id)
            if call.invalid:
                raise InvalidInput(call.invalid)
            if refuse:
                raise Unavailable(SHUTTING_DOWN)
            job = work(request, self.models().get(call.model), call)
            return await (within(job, call.deadline) if call.enforce_deadline else job)
        except asyncio.CancelledError:
            code = _ended(context, call)
            raise
        except Exception as exc:
            code, message = status_of(exc)
            call.request_id = echoed(call.request_id)  # the failure's answer echoes it: never a huge one
            self._errors.failed(
                code,
                message,
                model=label,
                method=call.method,
                request_id=call.request_id,
                exc=exc if is_unexpected(exc) else None,
            )
            forget_frames(exc)
        finally:
            self._count(label, call.method, code, started)
        return Failed(code, message)

    def _count(self, label: str, method: str, code: grpc.StatusCode, started: float) -> None:
        self.metrics.observe_request(label, method, code.name, time.perf_counter() - started)
        self.answered += 1

    async def _until_port_closed(self, context: grpc.aio.ServicerContext) -> None:
        """While draining, hold an answer (or the end of a stream) until GOAWAY is out, so the
        client learns this server is going before it can send its next call (drain.py)."""
        if self.gate.draining:
            remaining = context.time_remaining()
            await self.gate.port_closed(None if remaining is None else remaining - ANSWER_MARGIN_S)


class _Stream(Generic[Req]):
    """One pipelined stream: a reader task reads messages while the stream has room for them and
    starts a handler task for each; the answers go out in the order they are ready.

    Each message gets the server's default timeout. A stream deadline ends the whole call: gRPC
    cancels the stream then, which drops whatever it still has in flight."""

    def __init__(
        self,
        handling: CallHandling,
        requests: AsyncIterator[Req | Undecodable],
        context: grpc.aio.ServicerContext,
        call_of: Callable[[Req | Undecodable], Call],
        work: Work[Req],
        failed: Callable[[Req | Undecodable, Call, Failed], Message],
    ):
        self._handling = handling
        self._requests = requests
        self._context = context
        self._call_of = call_of
        self._work = work
        self._failed = failed
        self._request_id = _request_id_of(context)  # the stream's, for messages that carry none
        self._window = asyncio.Semaphore(STREAM_WINDOW)  # messages read whose answers are not sent yet
        self._bulk: Servable | None = None  # the model whose bulk lane the last message read went to
        self._answers: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._handlers: set[asyncio.Task[None]] = set()
        self._reader: asyncio.Task[None] | None = None

    async def responses(self) -> AsyncGenerator[bytes, None]:
        self._reader = reader = asyncio.create_task(self._read())
        self._handling._readers.add(reader)
        reader.add_done_callback(self._handling._readers.discard)
        reader.add_done_callback(self._end_if_all_answered)
        try:
            while (response := await self._answers.get()) is not None:
                yield response  # returns once gRPC has sent it (or the client has room for it)
                self._window.release()
            await self._handling._until_port_closed(self._context)
            await asyncio.wait({reader})
            if reader.cancelled():  # only drain() cancels it while the stream is being served
                await abort(self._context, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            reader.result()  # surfaces a broken request stream
        finally:
            reader.cancel()
            for task in list(self._handlers):
                task.cancel()

    async def _may_read(self) -> None:
        """The one place the reader waits before it reads, while HTTP/2 flow control holds the
        client back: for room in the stream's window, which an answer holds until it is sent (a
        message once read is always answered, and a client that does not read its answers must
        not make the server keep more of them), and, when the last message went to a bulk lane,
        for room in that lane (so that little bulk work waits in the server)."""
        if self._window.locked():
            with self._handling.metrics.paused("window"):
                await self._window.acquire()
        else:
            await self._window.acquire()
        bulk = self._bulk
        if bulk is not None and not bulk.has_room(BULK):
            with self._handling.metrics.paused("lane"):
                await bulk.room(BULK)

    async def _read(self) -> None:
        iterator = aiter(self._requests)
        while True:
            await self._may_read()
            request = await anext(iterator, None)
            if request is None:
                return
            call = self._call_of(request)
            call.streaming = True
            self._bulk = self._handling.bulk_model(call)
            task = asyncio.create_task(self._answer(request, call))
            self._handlers.add(task)
            task.add_done_callback(self._handler_done)

    async def _answer(self, request: Req | Undecodable, call: Call) -> None:
        self._handling._complete(call, None, call.request_id or self._request_id)
        outcome = await self._handling._answer(request, call, self._work, self._context, refuse=False)
        if isinstance(outcome, Failed):  # a small answer: an error and the echoed (short) names
            outcome = self._failed(request, call, outcome).SerializeToString()
        self._answers.put_nowait(outcome)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        self._end_if_all_answered()

    def _end_if_all_answered(self, _: object = None) -> None:
        # the reader stopped (end of stream, broken stream or drain()) and every message it read
        # has its answer queued: exactly once, whichever of the two happens last
        if self._reader is not None and self._reader.done() and not self._handlers:
            self._answers.put_nowait(None)


T = TypeVar("T")


async def within(work: Awaitable[T], deadline: float) -> T:
    """`work`, or DeadlineExceeded once `deadline` (time.monotonic) passes."""
    try:
        return await asyncio.wait_for(work, deadline - time.monotonic())
    except TimeoutError:
        raise DeadlineExceeded("the deadline passed before the request could be answered; it was dropped") from None


def _request_id_of(context: grpc.aio.ServicerContext) -> str:
    """The call's `x-request-id` metadata, or ""."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER:
            return value if isinstance(value, str) else ""
    return ""


def _ended(context: grpc.aio.ServicerContext, call: Call) -> grpc.StatusCode:
    """How a call that gRPC ended (it cancelled the handler) ended: its deadline passed (gRPC's
    own clock decides; ours may read a hair earlier), or else the client cancelled it."""
    if _expired(context) or time.monotonic() >= call.deadline - CLOCK_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _expired(context: grpc.aio.ServicerContext) -> bool:
    """The call's own (client) deadline has passed, by gRPC's clock."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0
