"""The Classifier servicer: convert the request, call the domain layer, convert the response.

Request handling shared with the other protocols (counting, logging, deadlines, streams, drain)
lives in `calls.py`; this module only converts mobiserve.v1 messages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from mobiserve.server.serving import ModelRegistry, Servable, checked_top_k
from mobiserve.server.transport.calls import SHUTTING_DOWN, Calls, Failed
from mobiserve.server.transport.convert import images_of, model_info, response_of
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

__all__ = ["SHUTTING_DOWN", "ClassifierServicer"]


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, calls: Calls):
        self.calls = calls

    @property
    def registry(self) -> ModelRegistry | None:
        """The served models, once loaded and warm."""
        return self.calls.registry

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        return await self.calls.unary(
            context,
            lambda deadline, refuse, enforce: self._classify(request, "Classify", context, deadline, refuse, enforce),
        )

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyResponse]:
        """Pipelined: many requests in flight, answered in completion order."""

        async def handle(request: pb.ClassifyRequest, deadline: float) -> pb.ClassifyResponse:
            return await self._classify(request, "ClassifyStream", context, deadline, False, True)

        def failed(request: pb.ClassifyRequest, why: Failed) -> pb.ClassifyResponse:
            return pb.ClassifyResponse(
                request_id=request.request_id, error=pb.Error(code=why.code.value[0], message=why.message)
            )

        async for response in self.calls.stream(request_iterator, context, handle, failed):
            yield response

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        registry = self.calls.registry
        if registry is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "models are still loading")
            raise AssertionError("unreachable")
        return pb.ListModelsResponse(models=[model_info(m.description, m.name == registry.default) for m in registry])

    async def _classify(
        self,
        request: pb.ClassifyRequest,
        method: str,
        context: grpc.aio.ServicerContext,
        deadline: float,
        refuse: bool,
        enforce: bool,
    ) -> pb.ClassifyResponse:
        async def work(model: Servable) -> pb.ClassifyResponse:
            top_k = checked_top_k(request.top_k, model.description.num_classes)
            result = await model.classify(images_of(request), deadline)
            self.calls.observe(result)
            return response_of(request, result, top_k)

        return await self.calls.answer(
            method=method,
            model=request.model,
            request_id=request.request_id,
            context=context,
            deadline=deadline,
            refuse=refuse,
            enforce_deadline=enforce,
            work=work,
        )
