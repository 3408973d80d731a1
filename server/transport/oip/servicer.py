"""inference.GRPCInferenceService: Open Inference Protocol messages <-> the domain layer.

Inference goes through the same `Calls` as mobiserve.v1.Classifier (same batchers, status
mapping, metrics, drain gate and error log); this module only converts. Each served model is two
models of the protocol (names.py): the network under its own name, and its image face (an empty
name means the default model's network).
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from importlib import metadata

import grpc

from mobiserve.inference import grpc_service_pb2 as pb
from mobiserve.inference import grpc_service_pb2_grpc as pb_grpc
from mobiserve.server.errors import InvalidInput, ModelNotFound
from mobiserve.server.serving import ModelRegistry, Servable
from mobiserve.server.transport.calls import Calls, Failed, within
from mobiserve.server.transport.decode import Undecodable, lenient, refusing_undecodable
from mobiserve.server.transport.oip.models import model_config, model_metadata, model_statistics, repository_index
from mobiserve.server.transport.oip.names import Face, face_of
from mobiserve.server.transport.oip.tensors import images_of, integer_parameter, requested_outputs, response_of
from mobiserve.server.transport.status import status_of

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = SERVICE.full_name  # "inference.GRPCInferenceService"
EXTENSIONS = ("classification", "model_configuration", "statistics")
TIMEOUT = "timeout"  # request parameter: microseconds; a deadline like the call's own


InferRequest = pb.ModelInferRequest | Undecodable  # what gRPC hands the servicer (transport/decode.py)


def register(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Add the servicer as the generated `add_GRPCInferenceServiceServicer_to_server` does, but
    with request deserializers that never raise (as for Classifier, see `transport/servicer.py`):
    an inference request protobuf cannot parse gets INVALID_ARGUMENT (in a stream: an error
    answer, and the stream goes on), counted like any bad request; so does any other request."""
    handlers = {}
    for method in SERVICE.methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        if request is not pb.ModelInferRequest:  # inference refuses it in Calls.answer, counted
            behaviour = refusing_undecodable(behaviour)
        kind = grpc.stream_stream_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = kind(
            behaviour,
            request_deserializer=lenient(request, model_field=1, id_field=3),  # ModelInferRequest's model_name, id
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _server_version() -> str:
    try:
        return metadata.version("mobiserve")
    except metadata.PackageNotFoundError:
        return "0"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, calls: Calls):
        self.calls = calls
        self._version = _server_version()

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.calls.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        """False (not an error) for a model this server does not serve, as a readiness probe expects."""
        registry = self.calls.registry
        name = self._face(request.name).model
        ready = self.calls.ready and registry is not None and name in registry.models
        if ready and registry is not None and request.version:
            ready = registry.models[name].description.version == request.version
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="mobiserve", version=self._version, extensions=EXTENSIONS)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        face = self._face(request.name)
        model = await self._model(face.model, request.version, context)
        return model_metadata(model.description, face)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        face = self._face(request.name)
        model = await self._model(face.model, request.version, context)
        return pb.ModelConfigResponse(config=model_config(model.description, face))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        """One model's (either face's), or (no name) every served model's."""
        face = self._face(request.name)
        if request.name:
            models = [await self._model(face.model, request.version, context)]
        else:
            models = list(await self._registry(context))
        stats = self.calls.metrics.statistics
        return pb.ModelStatisticsResponse(
            model_stats=[model_statistics(m.description, stats(m.name), request.name) for m in models]
        )

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        registry = await self._registry(context)
        return repository_index([m.description for m in registry], self.calls.ready)

    async def ModelInfer(self, request: InferRequest, context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await self.calls.unary(context, functools.partial(self._infer, request, "ModelInfer", context))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[InferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Pipelined like ClassifyStream; a failed request is answered with error_message."""

        async def handle(request: InferRequest, deadline: float) -> pb.ModelStreamInferResponse | Failed:
            response = await self._infer(request, "ModelStreamInfer", context, deadline, False, True)
            return response if isinstance(response, Failed) else pb.ModelStreamInferResponse(infer_response=response)

        def failed(request: InferRequest, why: Failed) -> pb.ModelStreamInferResponse:
            if isinstance(request, Undecodable):
                echo = pb.ModelInferResponse(model_name=request.model, id=request.request_id)
            else:
                echo = pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                )
            return pb.ModelStreamInferResponse(error_message=why.message, infer_response=echo)

        async for response in self.calls.stream(request_iterator, context, handle, failed):
            yield response

    async def _infer(
        self,
        request: InferRequest,
        method: str,
        context: grpc.aio.ServicerContext,
        deadline: float,
        refuse: bool,
        enforce: bool,
    ) -> pb.ModelInferResponse | Failed:
        async def work(model: Servable) -> pb.ModelInferResponse:
            assert not isinstance(request, Undecodable)  # refused by answer(invalid=...)
            d = model.description
            _check_version(face.name or d.name, d.version, request.model_version)
            timeout_s = _timeout_s(request)
            images = images_of(request, d, face)
            outputs = requested_outputs(request, d, face)
            job = model.classify(images, min(deadline, time.monotonic() + timeout_s) if timeout_s else deadline)
            result = await (within(job, time.monotonic() + timeout_s) if timeout_s else job)
            self.calls.observe(result)
            return response_of(request, d, face, result.scores, outputs)

        if isinstance(request, Undecodable):
            model, request_id, invalid = request.model, request.request_id, request.reason
        else:
            model, request_id, invalid = request.model_name, request.id, ""
        face = self._face(model)
        return await self.calls.answer(
            method=method,
            model=face.model,
            request_id=request_id,
            context=context,
            deadline=deadline,
            refuse=refuse,
            enforce_deadline=enforce,
            work=work,
            invalid=invalid,
        )

    def _face(self, name: str) -> Face:
        registry = self.calls.registry
        return face_of(name, registry.models if registry is not None else ())

    async def _registry(self, context: grpc.aio.ServicerContext) -> ModelRegistry:
        registry = self.calls.registry
        if registry is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "models are still loading; retry shortly")
            raise AssertionError("unreachable")
        return registry

    async def _model(self, name: str, version: str, context: grpc.aio.ServicerContext) -> Servable:
        registry = await self._registry(context)
        try:
            model = registry.get(name)
            _check_version(model.name, model.description.version, version)
        except ModelNotFound as exc:
            await context.abort(*status_of(exc))
            raise AssertionError("unreachable") from None
        return model


def _check_version(name: str, served: str, asked: str) -> None:
    if asked and asked != served:
        raise ModelNotFound(f"model {name!r} has no version {asked!r}; this server serves version {served!r}")


def _timeout_s(request: pb.ModelInferRequest) -> float:
    """The `timeout` request parameter in seconds (0: none). Other parameters are let through:
    `priority` is accepted and ignored (one queue serves every request), and so are those of
    protocol extensions this server does not implement."""
    if TIMEOUT not in request.parameters:
        return 0.0
    micros = integer_parameter(request.parameters[TIMEOUT], TIMEOUT)
    if micros < 0:
        raise InvalidInput(f"parameter {TIMEOUT!r} is {micros}; give microseconds (0: none)")
    return micros / 1e6
