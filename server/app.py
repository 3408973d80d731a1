"""Wires config -> models -> batchers -> grpc.aio server, and runs it until a signal.

Start-up order matters to callers: the port is bound and health answers NOT_SERVING at once;
models load and warm up in a worker thread; only then does health turn SERVING.
Shutdown (SIGTERM/SIGINT): health NOT_SERVING, stop taking RPCs, answer everything queued and in
flight within the grace period, then close the batchers and exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mobiserve.server.config import ModelConfig, ServerConfig
from mobiserve.server.metrics import Metrics
from mobiserve.server.processing.labels import Labels
from mobiserve.server.processing.preprocess import ImageLimits
from mobiserve.server.runtime.model import Model
from mobiserve.server.runtime.session import SessionTuning
from mobiserve.server.serving import ModelRegistry, ServedModel
from mobiserve.server.transport.servicer import ClassifierServicer
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

log = logging.getLogger("mobiserve.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name  # "mobiserve.v1.Classifier"


def load_model(config: ModelConfig) -> Model:
    """Blocking: open the sessions and warm them up."""
    labels = Labels.load(config.synsets)
    tuning = SessionTuning(intra_op_threads=config.intra_op_threads, allow_spinning=config.allow_spinning)
    model = Model(config.path, labels, tuning, config.instances)
    model.warm_up(config.max_batch_size)
    return model


@dataclass
class App:
    config: ServerConfig
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    servicer: ClassifierServicer
    metrics: Metrics
    preprocess_pool: ThreadPoolExecutor

    async def load(self) -> ModelRegistry:
        """Load and warm every model, then turn SERVING. Raises ModelLoadError on a bad model."""
        loop = asyncio.get_running_loop()
        limits = ImageLimits(max_pixels=self.config.max_pixels)
        served = []
        for config in self.config.models:
            config = config.resolved()
            model = await loop.run_in_executor(None, load_model, config)
            served.append(
                ServedModel(
                    config, model, self.preprocess_pool, limits, self.config.max_images_per_request,
                    on_batch=lambda size, seconds, name=config.name: self.metrics.observe_batch(name, size, seconds),
                )
            )
            log.info("event=model_loaded model=%s path=%s instances=%d intra_op_threads=%d max_batch_size=%d",
                     config.name, config.path, config.instances, config.intra_op_threads, config.max_batch_size)
        registry = ModelRegistry(served, self.config.default)
        for model in registry:
            model.start()
            self.metrics.model_ready.labels(model.name).set(1)
            self.metrics.queue_depth.labels(model.name).set_function(lambda b=model.batcher: b.admitted)
        self.servicer.registry = registry
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("event=serving port=%d models=%s default=%s", self.port, ",".join(registry.models), registry.default)
        return registry

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, finish queued and in-flight work, close."""
        grace = self.config.grace_s if grace_s is None else grace_s
        log.info("event=draining grace_s=%.1f", grace)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.servicer.registry is not None:
            for model in self.servicer.registry:
                await model.close()
                self.metrics.model_ready.labels(model.name).set(0)
        self.preprocess_pool.shutdown(wait=False, cancel_futures=True)
        log.info("event=stopped")


async def create_app(config: ServerConfig) -> App:
    """Bind and start the server (health NOT_SERVING); call `App.load()` next."""
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    metrics = Metrics()
    servicer = ClassifierServicer(metrics, config.default_timeout_s)
    pb_grpc.add_ClassifierServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, _credentials(config)) if config.tls_cert else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    await server.start()
    if config.metrics_port:
        metrics.serve_http(config.host, config.metrics_port)
    pool = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="preprocess")
    log.info("event=listening address=%s:%d tls=%s", config.host, port, bool(config.tls_cert))
    return App(config, server, port, health_servicer, servicer, metrics, pool)


def _credentials(config: ServerConfig) -> grpc.ServerCredentials:
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


async def run(config: ServerConfig) -> None:
    """Serve until SIGTERM/SIGINT, then drain. Raises ModelLoadError if a model cannot load."""
    app = await create_app(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        loader = asyncio.create_task(app.load())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({loader, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if loader.done():
            loader.result()  # a load failure ends the process with its message
            await stopped
        else:
            loader.cancel()
    finally:
        await app.stop()
