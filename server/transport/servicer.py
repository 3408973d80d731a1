"""The Classifier servicer: convert the request, call the domain layer, convert the response.

Request handling shared with the other protocols (deadlines, counting, logging, streams, drain)
lives in `calls.py`; this module only converts mobiserve.v1 messages.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import grpc

from mobiserve.server.errors import InvalidInput
from mobiserve.server.serving import Servable, checked_top_k
from mobiserve.server.transport.calls import Call, CallHandling, Failed
from mobiserve.server.transport.convert import answer_bytes, images_of, level_of, model_info, response_of
from mobiserve.server.transport.decode import Undecodable, lenient
from mobiserve.server.transport.sizes import check_fits
from mobiserve.server.transport.status import with_status
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

SERVICE = pb.DESCRIPTOR.services_by_name["Classifier"]
Request = pb.ClassifyRequest | Undecodable  # what gRPC hands the servicer (transport/decode.py)


def register(servicer: ClassifierServicer, server: grpc.aio.Server) -> None:
    """Add the servicer to the server, as the generated `add_ClassifierServicer_to_server` does,
    but with request deserializers that never raise: a message protobuf cannot parse reaches the
    servicer as Undecodable and gets INVALID_ARGUMENT (in a stream: an error answer, and the
    stream goes on), instead of UNKNOWN from inside gRPC and, in a stream, the end of the stream.

    Classify is handled as client-streaming (the same frames on the wire: see `CallHandling.unary`),
    and the inference methods answer with bytes they serialized themselves (`CallHandling.serialized`)."""
    handlers = {
        "Classify": grpc.stream_unary_rpc_method_handler(
            servicer.Classify, request_deserializer=lenient(pb.ClassifyRequest)
        ),
        "ClassifyStream": grpc.stream_stream_rpc_method_handler(
            servicer.ClassifyStream, request_deserializer=lenient(pb.ClassifyRequest)
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=lenient(pb.ListModelsRequest),
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, handling: CallHandling, expose_model_paths: bool = False):
        self.handling = handling
        self.expose_model_paths = expose_model_paths  # ListModels: full paths only on an operator's opt-in

    # The inference methods differ from the generated base on purpose (`register` says how)
    async def Classify(  # type: ignore[override]
        self, request_iterator: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> bytes:
        call_of = functools.partial(_call, method="Classify")
        return await self.handling.unary(context, request_iterator, "Classify", call_of, self._classify)

    async def ClassifyStream(  # type: ignore[override]
        self, request_iterator: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Pipelined: many requests in flight, answered in completion order."""
        call_of = functools.partial(_call, method="ClassifyStream")
        async for response in self.handling.stream(request_iterator, context, call_of, self._classify, _failed):
            yield response

    @with_status
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        registry = self.handling.models()
        return pb.ListModelsResponse(
            models=[model_info(m.description, m.name == registry.default, self.expose_model_paths) for m in registry]
        )

    async def _classify(self, request: pb.ClassifyRequest, model: Servable, call: Call) -> bytes:
        d = model.description
        top_k = checked_top_k(request.top_k, d.num_classes)
        images = images_of(request)
        size = answer_bytes(len(images), top_k, d.name, d.labels)
        check_fits(size, self.handling.max_message_bytes, "images or classes")
        result = await self.handling.classify(model, images, call)
        return await self.handling.serialized(lambda: response_of(call.request_id, result, top_k), size)


def _call(request: Request, method: str) -> Call:
    if isinstance(request, Undecodable):
        return Call(method=method, model=request.model, request_id=request.request_id)
    try:
        level = level_of(request.priority)
    except InvalidInput as exc:
        return Call(method=method, model=request.model, request_id=request.request_id, invalid=str(exc))
    return Call(method=method, model=request.model, request_id=request.request_id, priority=level)


def _failed(request: Request, call: Call, why: Failed) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(request_id=call.request_id, error=pb.Error(code=why.code.value[0], message=why.message))
