"""The Classifier servicer: convert the request, call the domain layer, convert the response."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from mobiserve.server.errors import Unavailable
from mobiserve.server.metrics import Metrics
from mobiserve.server.serving import Classified, ModelRegistry
from mobiserve.server.transport.convert import images_of, model_info, response_of
from mobiserve.server.transport.status import status_of
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

STREAM_WINDOW = 128  # requests in flight per stream; past it we stop reading (HTTP/2 flow control pushes back)


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, metrics: Metrics, default_timeout_s: float):
        self.registry: ModelRegistry | None = None  # set once the models are loaded and warm
        self.metrics = metrics
        self.default_timeout_s = default_timeout_s

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        deadline = self._deadline(context)
        try:
            return await self._classify(request, "Classify", deadline)
        except Exception as exc:
            code, message = status_of(exc)
            await context.abort(code, message)
            raise  # unreachable: abort raises

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyResponse]:
        """Pipelined: up to STREAM_WINDOW requests in flight, answered in completion order."""
        answers: asyncio.Queue[pb.ClassifyResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        handlers: set[asyncio.Task[None]] = set()
        stream_deadline = context.time_remaining()
        stream_end = None if stream_deadline is None else time.monotonic() + stream_deadline

        async def answer(request: pb.ClassifyRequest) -> None:
            try:
                deadline = time.monotonic() + self.default_timeout_s
                if stream_end is not None:
                    deadline = min(deadline, stream_end)
                response = await self._classify(request, "ClassifyStream", deadline)
            except Exception as exc:
                code, message = status_of(exc)
                response = pb.ClassifyResponse(request_id=request.request_id, error=pb.Error(code=code.value[0], message=message))
            finally:
                window.release()
            answers.put_nowait(response)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(answer(request))
                    handlers.add(task)
                    task.add_done_callback(handlers.discard)
            finally:
                if handlers:
                    await asyncio.gather(*handlers, return_exceptions=True)
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            for task in list(handlers):
                task.cancel()

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        registry = self.registry
        if registry is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "models are still loading")
            raise AssertionError("unreachable")
        return pb.ListModelsResponse(models=[model_info(m, m.name == registry.default) for m in registry])

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return time.monotonic() + (self.default_timeout_s if remaining is None else remaining)

    async def _classify(self, request: pb.ClassifyRequest, method: str, deadline: float) -> pb.ClassifyResponse:
        started = time.perf_counter()
        model_label = request.model or "(default)"
        code = grpc.StatusCode.OK
        try:
            if self.registry is None:
                raise Unavailable("models are still loading; retry shortly")
            model = self.registry.get(request.model)
            model_label = model.name
            result = await model.classify(images_of(request), request.top_k, deadline)
            self._observe(result)
            return response_of(request, result)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = status_of(exc)[0]
            raise
        finally:
            m = self.metrics
            m.requests.labels(model_label, method, code.name).inc()
            m.request_seconds.labels(model_label, method).observe(time.perf_counter() - started)

    def _observe(self, result: Classified) -> None:
        m, t = self.metrics, result.timing
        m.images.labels(result.model).inc(len(result.results))
        m.queue_seconds.labels(result.model).observe(t.queue_us / 1e6)
        m.preprocess_seconds.labels(result.model).observe(t.preprocess_us / 1e6)
