"""The Classifier servicer: convert the request, call the domain layer, convert the response.

Every request or stream message is counted once in `mobiserve_requests_total` with the status it
got, and failures other than plain client mistakes are logged with its request id (throttled).
`drain()` is the servicer's part of a graceful shutdown: each open stream stops reading, answers
every message it has read, then ends with UNAVAILABLE so the client knows to send the rest
elsewhere; a call that arrives afterwards is refused with UNAVAILABLE at once (`drain.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable

import grpc

from mobiserve.server.errors import DeadlineExceeded, InvalidInput, Unavailable
from mobiserve.server.metrics import Metrics
from mobiserve.server.serving import Classified, ModelRegistry, checked_top_k
from mobiserve.server.transport.convert import images_of, model_info, response_of
from mobiserve.server.transport.decode import Undecodable, lenient
from mobiserve.server.transport.drain import CallGate
from mobiserve.server.transport.errorlog import ErrorLog
from mobiserve.server.transport.status import is_unexpected, status_of
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

STREAM_WINDOW = 128  # requests in flight per stream; past it we stop reading (HTTP/2 flow control pushes back)
ANSWER_MARGIN_S = 0.05  # a held answer goes out this long before its call's deadline at the latest
SHUTTING_DOWN = "the server is shutting down; send the request to another instance or retry shortly"
SERVICE = pb.DESCRIPTOR.services_by_name["Classifier"].full_name  # "mobiserve.v1.Classifier"
DEFAULT_LABEL = "(default)"  # metrics/log label of a request naming no model, before one is resolved
UNKNOWN_LABEL = "(unknown)"  # ... naming a model this server does not serve: labels stay a bounded set


Request = pb.ClassifyRequest | Undecodable  # what gRPC hands the servicer (transport/decode.py)


def register(servicer: ClassifierServicer, server: grpc.aio.Server) -> None:
    """Add the servicer to the server, as the generated `add_ClassifierServicer_to_server` does,
    but with request deserializers that never raise: a message protobuf cannot parse reaches the
    servicer as Undecodable and gets INVALID_ARGUMENT (in a stream: an error answer, and the
    stream goes on), instead of UNKNOWN from inside gRPC and, in a stream, the end of the stream."""
    handlers = {
        "Classify": grpc.unary_unary_rpc_method_handler(
            servicer.Classify,
            request_deserializer=lenient(pb.ClassifyRequest, "ClassifyRequest"),
            response_serializer=pb.ClassifyResponse.SerializeToString,
        ),
        "ClassifyStream": grpc.stream_stream_rpc_method_handler(
            servicer.ClassifyStream,
            request_deserializer=lenient(pb.ClassifyRequest, "ClassifyRequest"),
            response_serializer=pb.ClassifyResponse.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=lenient(pb.ListModelsRequest, "ListModelsRequest"),
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class Failed(Exception):
    """A request's outcome when it is not a response: the status to send, already logged and counted."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(code, message)
        self.code = code
        self.message = message


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(
        self,
        metrics: Metrics,
        default_timeout_s: float,
        model_names: Iterable[str],
        expose_model_paths: bool = False,
    ):
        self.registry: ModelRegistry | None = None  # set once the models are loaded and warm
        self.model_sha256: dict[str, str] = {}  # by model name, set with the registry
        self.expose_model_paths = expose_model_paths
        self.metrics = metrics
        self.default_timeout_s = default_timeout_s
        self._model_names = frozenset(model_names)
        self._errors = ErrorLog(log)
        self.gate = CallGate()
        self._readers: set[asyncio.Task[None]] = set()

    def drain(self) -> None:
        """Start refusing new work; make every open stream stop reading and finish what it has read."""
        self.gate.drain()
        for reader in list(self._readers):
            reader.cancel()

    async def Classify(self, request: Request, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        remaining = context.time_remaining()
        deadline = time.monotonic() + (self.default_timeout_s if remaining is None else remaining)
        with self.gate.call():
            try:
                response = await self._classify(
                    request,
                    "Classify",
                    deadline,
                    context,
                    refuse=self.gate.draining,
                    enforce_deadline=remaining is None,
                )
            except Failed as failed:
                if failed.code == grpc.StatusCode.DEADLINE_EXCEEDED and _expired(context):
                    # gRPC is ending the call with DEADLINE_EXCEEDED itself; a status sent now
                    # would race it (and gRPC would log the lost race as an error)
                    raise asyncio.CancelledError() from None
                await self._until_port_closed(context)
                await context.abort(failed.code, failed.message)
                raise  # unreachable: abort raises
            await self._until_port_closed(context)
            return response

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyResponse]:
        """Pipelined: up to STREAM_WINDOW requests in flight, answered in completion order."""
        with self.gate.call():
            if self.gate.draining:
                await self._until_port_closed(context)
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            async with contextlib.aclosing(self._stream(request_iterator, context)) as responses:
                async for response in responses:  # closed with this generator: tasks end at once
                    yield response

    async def _stream(
        self, request_iterator: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[pb.ClassifyResponse, None]:
        answers: asyncio.Queue[pb.ClassifyResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        handlers: set[asyncio.Task[None]] = set()

        async def answer(request: Request) -> None:
            # Each message gets the default timeout. A stream deadline ends the whole call: gRPC
            # cancels this handler then, which drops whatever the stream still has queued.
            deadline = time.monotonic() + self.default_timeout_s
            try:
                response = await self._classify(
                    request, "ClassifyStream", deadline, context, refuse=False, enforce_deadline=True
                )
            except Failed as failed:
                response = pb.ClassifyResponse(
                    request_id=request.request_id, error=pb.Error(code=failed.code.value[0], message=failed.message)
                )
            finally:
                window.release()
            answers.put_nowait(response)

        async def read() -> None:
            requests = aiter(request_iterator)
            while True:
                await window.acquire()  # before reading: a message once read is always answered
                request = await anext(requests, None)
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

    async def _until_port_closed(self, context: grpc.aio.ServicerContext) -> None:
        """While draining, hold an answer (or the end of a stream) until GOAWAY is out, so the
        client learns this server is going before it can send its next call (drain.py)."""
        if self.gate.draining:
            remaining = context.time_remaining()
            await self.gate.port_closed(None if remaining is None else remaining - ANSWER_MARGIN_S)

    async def ListModels(
        self, request: pb.ListModelsRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        registry = self.registry
        if registry is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "models are still loading")
            raise AssertionError("unreachable")
        return pb.ListModelsResponse(
            models=[
                model_info(
                    m.description,
                    m.name == registry.default,
                    sha256=self.model_sha256.get(m.name, ""),
                    full_path=self.expose_model_paths,
                )
                for m in registry
            ]
        )

    async def _classify(
        self,
        request: Request,
        method: str,
        deadline: float,
        context: grpc.aio.ServicerContext,
        *,
        refuse: bool,
        enforce_deadline: bool,
    ) -> pb.ClassifyResponse:
        """Answer one request, or raise Failed. Counts it exactly once, whatever happens.

        enforce_deadline: end the request when `deadline` passes even if it is still waiting (a
        default timeout: gRPC enforces client deadlines itself, by cancelling the call)."""
        started = time.perf_counter()
        label = self._label(request.model)
        code = grpc.StatusCode.OK
        try:
            if isinstance(request, Undecodable):
                raise InvalidInput(request.reason)
            if refuse:
                raise Unavailable(SHUTTING_DOWN)
            if self.registry is None:
                raise Unavailable("models are still loading; retry shortly")
            model = self.registry.get(request.model)
            top_k = checked_top_k(request.top_k, model.description.num_classes)
            work = model.classify(images_of(request), deadline)
            try:
                result = await (asyncio.wait_for(work, deadline - time.monotonic()) if enforce_deadline else work)
            except TimeoutError:
                raise DeadlineExceeded(
                    "the deadline passed before the request could be answered; it was dropped"
                ) from None
            self._observe(result)
            return response_of(request, result, top_k)
        except asyncio.CancelledError:
            # the client went away, or the call's deadline passed and gRPC cancelled it (gRPC's
            # own clock decides: ours may read a hair earlier)
            expired = _expired(context) or time.monotonic() >= deadline
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, message = status_of(exc)
            self._errors.failed(
                code,
                message,
                model=label,
                method=method,
                request_id=request.request_id,
                exc=exc if is_unexpected(exc) else None,
            )
            raise Failed(code, message) from None
        finally:
            m = self.metrics
            m.requests.labels(label, method, code.name).inc()
            m.request_seconds.labels(label, method).observe(time.perf_counter() - started)

    def _label(self, name: str) -> str:
        """The model's name for metrics and logs, from a bounded set whatever the client sends."""
        registry = self.registry
        if not name:
            return registry.default if registry is not None else DEFAULT_LABEL
        return name if name in self._model_names else UNKNOWN_LABEL

    def _observe(self, result: Classified) -> None:
        m, t = self.metrics, result.timing
        m.images.labels(result.model).inc(len(result.scores))
        m.queue_seconds.labels(result.model).observe(t.queue_us / 1e6)
        m.preprocess_seconds.labels(result.model).observe(t.preprocess_us / 1e6)


def _expired(context: grpc.aio.ServicerContext) -> bool:
    """The call's own (client) deadline has passed, by gRPC's clock."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0
