"""inference.GRPCInferenceService: Open Inference Protocol messages <-> the domain layer.

Inference goes through the same `CallHandling` as mobiserve.v1.Classifier (same batchers, status
mapping, deadlines, metrics, drain gate and error log); this module only converts. Each served
model is two models of the protocol (names.py): the network under its own name, and its image
face (an empty name means the default model's network).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from importlib import metadata

import grpc

from mobiserve.inference import grpc_service_pb2 as pb
from mobiserve.inference import grpc_service_pb2_grpc as pb_grpc
from mobiserve.server.errors import InvalidInput, ModelNotFound
from mobiserve.server.serving import Servable
from mobiserve.server.transport.calls import Call, CallHandling, Failed
from mobiserve.server.transport.decode import Undecodable, lenient
from mobiserve.server.transport.oip.models import (
    model_config,
    model_metadata,
    model_ready,
    model_statistics,
    repository_index,
)
from mobiserve.server.transport.oip.names import Face, face_of
from mobiserve.server.transport.oip.tensors import (
    answer_bytes,
    images_of,
    integer_parameter,
    requested_outputs,
    response_of,
)
from mobiserve.server.transport.sizes import check_fits, echoed
from mobiserve.server.transport.status import with_status

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
EXTENSIONS = ("classification", "model_configuration", "statistics")
INFERENCE = ("ModelInfer", "ModelStreamInfer")  # through CallHandling: counted, answered with bytes
TIMEOUT = "timeout"  # request parameter: microseconds; a deadline like the call's own
PRIORITY = "priority"  # request parameter: a priority level, 1 the most urgent, 0 the model's default


InferRequest = pb.ModelInferRequest | Undecodable  # what gRPC hands the servicer (transport/decode.py)


def register(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Add the servicer as the generated `add_GRPCInferenceServiceServicer_to_server` does, but
    with request deserializers that never raise (as for Classifier, see `transport/servicer.py`):
    an inference request protobuf cannot parse gets INVALID_ARGUMENT (in a stream: an error
    answer, and the stream goes on), counted like any bad request; so does any other request
    (`status.with_status`), uncounted."""
    handlers = {}
    for method in SERVICE.methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        deserializer = lenient(request, model_field=1, id_field=3)  # ModelInferRequest's model_name, id
        behaviour = getattr(servicer, method.name)
        if method.name in INFERENCE:  # as Classifier's: client-streaming, answering with its own bytes
            kind = (
                grpc.stream_stream_rpc_method_handler
                if method.server_streaming
                else grpc.stream_unary_rpc_method_handler
            )
            handlers[method.name] = kind(behaviour, request_deserializer=deserializer)
        else:
            kind = (
                grpc.stream_stream_rpc_method_handler
                if method.client_streaming
                else grpc.unary_unary_rpc_method_handler
            )
            handlers[method.name] = kind(
                behaviour, request_deserializer=deserializer, response_serializer=response.SerializeToString
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _server_version() -> str:
    try:
        return metadata.version("mobiserve")
    except metadata.PackageNotFoundError:
        return "0"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, handling: CallHandling):
        self.handling = handling
        self._version = _server_version()

    @with_status
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @with_status
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.handling.ready)

    @with_status
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """False (not an error) for a model this server does not serve, as a readiness probe expects."""
        registry = self.handling.registry
        name = self._face(request.name).model
        ready = self.handling.ready and registry is not None and model_ready(registry, name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    @with_status
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="mobiserve", version=self._version, extensions=EXTENSIONS)

    @with_status
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        face = self._face(request.name)
        return model_metadata(self._model(face.model, request.version).description, face)

    @with_status
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        face = self._face(request.name)
        return pb.ModelConfigResponse(config=model_config(self._model(face.model, request.version).description, face))

    @with_status
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        """One model's (either face's), or (no name) every served model's."""
        face = self._face(request.name)
        models = [self._model(face.model, request.version)] if request.name else list(self.handling.models())
        stats = self.handling.metrics.statistics
        return pb.ModelStatisticsResponse(
            model_stats=[model_statistics(m.description, stats(m.name), request.name) for m in models]
        )

    @with_status
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        return repository_index([m.description for m in self.handling.models()], self.handling.ready)

    # The inference methods differ from the generated base on purpose (`register` says how)
    async def ModelInfer(  # type: ignore[override]
        self, request_iterator: AsyncIterator[InferRequest], context: grpc.aio.ServicerContext
    ) -> bytes:
        call_of = functools.partial(self._call, method="ModelInfer")
        return await self.handling.unary(context, request_iterator, "ModelInfer", call_of, self._infer)

    async def ModelStreamInfer(  # type: ignore[override]
        self, request_iterator: AsyncIterator[InferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Pipelined like ClassifyStream; a failed request is answered with error_message."""
        call_of = functools.partial(self._call, method="ModelStreamInfer")
        async for response in self.handling.stream(request_iterator, context, call_of, self._infer_streamed, _failed):
            yield response

    async def _infer(self, request: pb.ModelInferRequest, model: Servable, call: Call) -> bytes:
        return await self._answer(request, model, call, streamed=False)

    async def _infer_streamed(self, request: pb.ModelInferRequest, model: Servable, call: Call) -> bytes:
        return await self._answer(request, model, call, streamed=True)

    async def _answer(self, request: pb.ModelInferRequest, model: Servable, call: Call, *, streamed: bool) -> bytes:
        d = model.description
        if call.priority > d.priority_levels:
            call.priority = 0  # as Triton does: a level the model does not have means its default
        face = self._face(request.model_name)
        _check_version(face.name or d.name, d.version, request.model_version)
        images = images_of(request, d, face)
        outputs = requested_outputs(request, d, face)
        size = answer_bytes(d, face, len(images), outputs)
        check_fits(size, self.handling.max_message_bytes, "images or classifications")
        result = await self.handling.classify(model, images, call)

        def build() -> pb.ModelInferResponse | pb.ModelStreamInferResponse:
            response = response_of(call.request_id, d, face, result.scores, outputs)
            return pb.ModelStreamInferResponse(infer_response=response) if streamed else response

        return await self.handling.serialized(build, size)

    def _call(self, request: InferRequest, method: str) -> Call:
        """The call to the served model the name means (either face: names.py)."""
        if isinstance(request, Undecodable):
            return Call(method=method, model=self._face(request.model).model, request_id=request.request_id)
        model = self._face(request.model_name).model
        try:
            timeout_s, level = _timeout_s(request), _priority(request)
        except InvalidInput as exc:
            return Call(method=method, model=model, request_id=request.id, invalid=str(exc))
        return Call(method=method, model=model, request_id=request.id, timeout_s=timeout_s, priority=level)

    def _face(self, name: str) -> Face:
        registry = self.handling.registry
        return face_of(name, registry.models if registry is not None else ())

    def _model(self, name: str, version: str) -> Servable:
        model = self.handling.models().get(name)
        _check_version(model.name, model.description.version, version)
        return model


def _failed(request: InferRequest, call: Call, why: Failed) -> pb.ModelStreamInferResponse:
    if isinstance(request, Undecodable):
        name, version = request.model, ""
    else:
        name, version = request.model_name, request.model_version
    echo = pb.ModelInferResponse(model_name=echoed(name), model_version=echoed(version), id=call.request_id)
    return pb.ModelStreamInferResponse(error_message=why.message, infer_response=echo)


def _check_version(name: str, served: str, asked: str) -> None:
    if asked and asked != served:
        raise ModelNotFound(f"model {name!r} has no version {asked!r}; this server serves version {served!r}")


def _timeout_s(request: pb.ModelInferRequest) -> float:
    """The `timeout` request parameter in seconds (0: none): the request's deadline, if it comes
    before the call's own. Parameters other than `timeout` and `priority` are let through: those
    of protocol extensions this server does not implement."""
    if TIMEOUT not in request.parameters:
        return 0.0
    micros = integer_parameter(request.parameters[TIMEOUT], TIMEOUT)
    if micros < 0:
        raise InvalidInput(f"parameter {TIMEOUT!r} is {micros}; give microseconds (0: none)")
    return micros / 1e6


def _priority(request: pb.ModelInferRequest) -> int:
    """The `priority` request parameter, as Triton reads it: a level, 1 the most urgent, 0 (or
    absent) the model's default; a level above the model's levels is its default too (`_infer`)."""
    if PRIORITY not in request.parameters:
        return 0
    level = integer_parameter(request.parameters[PRIORITY], PRIORITY)
    if level < 0:
        raise InvalidInput(f"parameter {PRIORITY!r} is {level}; give a level, 1 the most urgent (0: the default)")
    return level
