"""The Classifier servicer: convert the request, call the domain layer, convert the response.

Request handling shared with the other protocols (counting, logging, deadlines, streams, drain)
lives in `calls.py`; this module only converts mobiserve.v1 messages.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import grpc

from mobiserve.server.serving import ModelRegistry, Servable, checked_top_k
from mobiserve.server.transport.calls import SHUTTING_DOWN, Calls, Failed
from mobiserve.server.transport.convert import images_of, model_info, response_of
from mobiserve.server.transport.decode import Undecodable, lenient, refusing_undecodable
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

__all__ = ["SHUTTING_DOWN", "ClassifierServicer", "register"]

SERVICE = pb.DESCRIPTOR.services_by_name["Classifier"].full_name  # "mobiserve.v1.Classifier"
Request = pb.ClassifyRequest | Undecodable  # what gRPC hands the servicer (transport/decode.py)


def register(servicer: ClassifierServicer, server: grpc.aio.Server) -> None:
    """Add the servicer to the server, as the generated `add_ClassifierServicer_to_server` does,
    but with request deserializers that never raise: a message protobuf cannot parse reaches the
    servicer as Undecodable and gets INVALID_ARGUMENT (in a stream: an error answer, and the
    stream goes on), instead of UNKNOWN from inside gRPC and, in a stream, the end of the stream."""
    handlers = {
        "Classify": grpc.unary_unary_rpc_method_handler(
            servicer.Classify,
            request_deserializer=lenient(pb.ClassifyRequest),
            response_serializer=pb.ClassifyResponse.SerializeToString,
        ),
        "ClassifyStream": grpc.stream_stream_rpc_method_handler(
            servicer.ClassifyStream,
            request_deserializer=lenient(pb.ClassifyRequest),
            response_serializer=pb.ClassifyResponse.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            refusing_undecodable(servicer.ListModels),
            request_deserializer=lenient(pb.ListModelsRequest),
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, calls: Calls, expose_model_paths: bool = False):
        self.calls = calls
        self.expose_model_paths = expose_model_paths  # ListModels: full paths only on an operator's opt-in

    @property
    def registry(self) -> ModelRegistry | None:
        """The served models, once loaded and warm."""
        return self.calls.registry

    async def Classify(self, request: Request, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        return await self.calls.unary(context, functools.partial(self._classify, request, "Classify", context))

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyResponse]:
        """Pipelined: many requests in flight, answered in completion order."""

        async def handle(request: Request, deadline: float) -> pb.ClassifyResponse | Failed:
            return await self._classify(request, "ClassifyStream", context, deadline, False, True)

        def failed(request: Request, why: Failed) -> pb.ClassifyResponse:
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
        return pb.ListModelsResponse(
            models=[model_info(m.description, m.name == registry.default, self.expose_model_paths) for m in registry]
        )

    async def _classify(
        self,
        request: Request,
        method: str,
        context: grpc.aio.ServicerContext,
        deadline: float,
        refuse: bool,
        enforce: bool,
    ) -> pb.ClassifyResponse | Failed:
        async def work(model: Servable) -> pb.ClassifyResponse:
            assert not isinstance(request, Undecodable)  # refused by answer(invalid=...)
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
            invalid=request.reason if isinstance(request, Undecodable) else "",
        )
