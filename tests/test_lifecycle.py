"""Health transitions, reflection, and start-up / shutdown of a real server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from mobiserve.server.app import App, create_app
from mobiserve.server.config import ServerConfig
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import model_config, request_of

SERVICES = ("", "mobiserve.v1.Classifier")


async def statuses(target: str) -> set[int]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return {(await stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=5)).status for s in SERVICES}


async def test_health_goes_not_serving_then_serving_then_not_serving(int8_model: Path, jpeg: bytes) -> None:
    app = await create_app(ServerConfig(models=(model_config(int8_model),), host="127.0.0.1", port=0))
    target = f"127.0.0.1:{app.port}"
    try:
        assert await statuses(target) == {health_pb2.HealthCheckResponse.NOT_SERVING}
        async with grpc.aio.insecure_channel(target) as ch:  # not ready: a clear UNAVAILABLE
            try:
                await pb_grpc.ClassifierStub(ch).Classify(request_of(jpeg), timeout=5)
                raise AssertionError("served before the model was loaded")
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE and "loading" in (e.details() or "")
        await app.load()
        assert await statuses(target) == {health_pb2.HealthCheckResponse.SERVING}
        await app.health.enter_graceful_shutdown()
        assert await statuses(target) == {health_pb2.HealthCheckResponse.NOT_SERVING}
    finally:
        await app.stop(grace_s=1)


def reflect(target: str) -> tuple[set[str], str]:
    with grpc.insecure_channel(target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        return set(db.get_services()), db.FindFileContainingSymbol("mobiserve.v1.Classifier").package


async def test_reflection_lists_the_services(server: App) -> None:
    # the reflection client is synchronous: keep it off the loop the server runs on
    services, package = await asyncio.to_thread(reflect, f"127.0.0.1:{server.port}")
    assert {"mobiserve.v1.Classifier", "grpc.health.v1.Health"} <= services
    assert package == "mobiserve.v1"
