"""Wires config -> models -> batchers -> grpc.aio server, and runs it until a signal.

Start-up order matters to callers: the port is bound and health answers NOT_SERVING at once;
models load and warm up in a worker thread; only then does health turn SERVING.
Shutdown (SIGTERM/SIGINT): health NOT_SERVING, stop taking RPCs, answer everything queued and in
flight within the grace period, then close the batchers and exit 0.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import signal
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from mobiserve.common.labels import Labels
from mobiserve.inference import grpc_service_pb2 as oip_pb
from mobiserve.server import threads
from mobiserve.server.config import ModelConfig, ServerConfig
from mobiserve.server.cores import available_cores
from mobiserve.server.memory import return_large_blocks_to_the_system, trim_when_idle
from mobiserve.server.metrics import Metrics
from mobiserve.server.metrics_http import MetricsServer
from mobiserve.server.processing.preprocess import ImageLimits
from mobiserve.server.runtime.model import Model
from mobiserve.server.runtime.session import SessionTuning
from mobiserve.server.serving import ModelRegistry, ServedModel
from mobiserve.server.transport.arrivals import UNREAD, Undelivered
from mobiserve.server.transport.calls import Calls
from mobiserve.server.transport.connections import connection_options
from mobiserve.server.transport.drain import HANDOFF_MAX_S
from mobiserve.server.transport.health import HealthServicer
from mobiserve.server.transport.oip.servicer import SERVICE_NAME as OIP_SERVICE_NAME
from mobiserve.server.transport.oip.servicer import InferenceServicer
from mobiserve.server.transport.oip.servicer import register as register_inference
from mobiserve.server.transport.servicer import ClassifierServicer, register
from mobiserve.v1 import classifier_pb2 as pb

log = logging.getLogger("mobiserve.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name  # "mobiserve.v1.Classifier"
SERVICES = (SERVICE_NAME, OIP_SERVICE_NAME)  # what health reports on, besides the server ("")


def load_model(config: ModelConfig) -> Model:
    """Blocking: open the sessions and warm them up."""
    labels = Labels.load(config.synsets)
    tuning = SessionTuning(intra_op_threads=config.intra_op_threads, allow_spinning=config.allow_spinning)
    model = Model(config.path, labels, tuning, config.instances)
    model.warm_up(config.max_batch_size)
    return model


@dataclass(frozen=True)
class Worker:
    """This process is worker `index` of `mobiserve serve --workers N` (server/workers.py)."""

    index: int
    all_ready: Any  # a multiprocessing Event the supervisor sets once every worker is ready
    ready: Any  # a multiprocessing Queue: (index, "ready") once it listens, (index, "serving") once SERVING


@dataclass
class App:
    config: ServerConfig
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    calls: Calls  # what both services share: registry, drain gate, metrics, error log
    servicer: ClassifierServicer
    inference: InferenceServicer
    metrics: Metrics
    preprocess_pool: ThreadPoolExecutor
    metrics_server: MetricsServer | None = None
    worker: Worker | None = None
    served: list[ServedModel] = field(default_factory=list)
    _sampler: asyncio.Task[None] | None = None
    _trimmer: asyncio.Task[None] | None = None

    async def load(self) -> ModelRegistry:
        """Load and warm every model, then turn SERVING. Raises ModelLoadError on a bad model."""
        registry = await self.load_models()
        await self.serving()
        return registry

    async def load_models(self) -> ModelRegistry:
        """Load and warm every model and take requests; health stays NOT_SERVING until `serving()`."""
        loop = asyncio.get_running_loop()
        limits = ImageLimits(max_pixels=self.config.max_pixels)
        served = self.served
        for config in self.config.models:
            config = config.resolved()
            model = await loop.run_in_executor(None, load_model, config)
            served.append(
                ServedModel(
                    config,
                    model,
                    self.preprocess_pool,
                    limits,
                    self.config.max_images_per_request,
                    on_batch=functools.partial(self.metrics.observe_batch, config.name),
                )
            )
            log.info(
                "event=model_loaded model=%s path=%s instances=%d intra_op_threads=%d max_batch_size=%d decode=%s",
                config.name,
                config.path,
                config.instances,
                config.intra_op_threads,
                config.max_batch_size,
                config.decode,
            )
        registry = ModelRegistry(served, self.config.default)
        for ready in served:
            ready.start()
            self.metrics.model_ready.labels(ready.name).set(1)
            log.info("event=model_ready model=%s", ready.name)
            if not self.metrics.multiprocess:
                self.metrics.queue_depth.labels(ready.name).set_function(ready.queued)
        if self.metrics.multiprocess:  # the supervisor cannot call back into this process
            self._sampler = asyncio.create_task(self._sample_queues(), name="queue-depth")
        busy = lambda: any(model.queued() for model in served)
        self._trimmer = asyncio.create_task(trim_when_idle(busy, lambda: self.calls.answered), name="trim")
        self.calls.registry = registry
        return registry

    async def serving(self) -> None:
        """Health SERVING: load balancers and health-checking clients send calls from now on."""
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        registry = self.calls.registry
        assert registry is not None, "load_models() first"
        event = "serving" if self.worker is None else "worker_serving"  # the supervisor says "serving"
        log.info("event=%s port=%d models=%s default=%s", event, self.port, ",".join(registry.models), registry.default)

    async def _sample_queues(self, every_s: float = 0.5) -> None:
        while True:
            for model in self.served:
                self.metrics.queue_depth.labels(model.name).set(model.queued())
            await asyncio.sleep(every_s)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, answer what was accepted, exit.

        A call arriving from now on is refused with UNAVAILABLE (safe to retry elsewhere); open
        streams answer every message they have read and end with UNAVAILABLE; unary calls in
        flight are answered. Answers wait for GOAWAY, which goes out (and the port closes)
        once gRPC has handed every call it holds to the servicers, within HANDOFF_MAX_S of the
        signal; transport/drain.py says why. The server exits as soon as what it accepted is
        answered, whatever its clients still send. What still runs after the grace period is
        cancelled."""
        grace = self.config.grace_s if grace_s is None else grace_s
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        log.info("event=draining grace_s=%.1f", grace)
        gate = self.calls.gate
        self.calls.drain()
        await self.health.enter_graceful_shutdown()
        for model in self.served:
            self.metrics.model_ready.labels(model.name).set(0)
        await gate.wait_handed_over(max_s=min(HANDOFF_MAX_S, grace))
        self.health.end_watches()  # they have sent NOT_SERVING; left open, they would hold stop()
        stopping = asyncio.ensure_future(self.server.stop(max(0.0, end - loop.time())))
        await asyncio.sleep(0)  # stop() sends GOAWAY and closes the port in its first step
        gate.close()  # now the answers go out
        try:
            await asyncio.wait_for(gate.wait_accepted(), max(0.0, end - loop.time()))
        except TimeoutError:
            log.warning(
                "event=grace_expired message=%r", "requests still in flight after the grace period are cancelled"
            )
        await stopping
        await self._release()
        log.info("event=stopped")

    async def close(self) -> None:
        """Stop at once, without a drain or its log lines: for a server that never served (a model
        failed to load), whose start-up error is all there is to say."""
        await self.server.stop(0)
        await self._release(quiet=True)

    async def _release(self, quiet: bool = False) -> None:
        for task in (self._sampler, self._trimmer):
            if task is not None:
                task.cancel()
        for model in self.served:
            await model.close()
            if not quiet:
                log.info("event=model_unloaded model=%s", model.name)
        self.preprocess_pool.shutdown(wait=False, cancel_futures=True)
        if self.metrics_server is not None:
            await self.metrics_server.close()


async def create_app(config: ServerConfig, worker: Worker | None = None) -> App:
    """Bind and start the server (health NOT_SERVING); call `App.load()` next.

    A worker binds the port its supervisor holds (SO_REUSEPORT) but starts listening only once
    its models are loaded (`run` does), so that no connection lands on a worker still loading."""
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", int(worker is not None)),
        *connection_options(config),
    ]
    metrics = Metrics()
    unary = [f"/{SERVICE_NAME}/Classify", f"/{OIP_SERVICE_NAME}/ModelInfer"]
    undelivered = Undelivered(functools.partial(metrics.observe_undelivered, UNREAD), unary)
    server = grpc.aio.server(options=options, interceptors=[undelivered])
    for model in config.models:
        metrics.model_ready.labels(model.name).set(0)  # the series exists (at 0) while loading
    calls = Calls(metrics, config.default_timeout_s, (m.name for m in config.models))
    servicer = ClassifierServicer(calls, config.expose_model_paths)
    register(servicer, server)
    inference = InferenceServicer(calls)
    register_inference(inference, server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection(
        (*SERVICES, health_name, reflection.SERVICE_NAME), server, pool=_reflection_pool()
    )
    for name in ("", *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{config.host}:{config.port}"
    credentials = _credentials(config) if config.tls_cert else None
    if worker is None:
        _check_bindable(config.host, config.port)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpc's way of saying the bind failed
        port = 0
    if port == 0:
        raise OSError(f"cannot bind {address}: the port is in use or the address is not on this machine")
    metrics_port, metrics_server = 0, None
    if config.metrics_port:
        metrics_server = MetricsServer(metrics.registry)
        try:
            metrics_port = await metrics_server.start(config.host, config.metrics_port)
        except OSError as exc:
            raise OSError(
                f"cannot serve metrics on {config.host}:{config.metrics_port}: {exc.strerror or exc}"
            ) from None
    if worker is None:
        await server.start()
    threads.name_grpc_poller()
    pool = ThreadPoolExecutor(
        config.preprocess_threads or available_cores(),
        thread_name_prefix="preprocess",
        initializer=threads.name_current,
    )
    tls = "mutual" if config.tls_client_ca else "server" if credentials else "off"
    event = "listening" if worker is None else "worker_listening"
    log.info("event=%s address=%s:%d tls=%s metrics_port=%d", event, config.host, port, tls, metrics_port)
    if not credentials and not _is_loopback(config.host):
        log.warning(
            "event=insecure_bind address=%s:%d message=%r",
            config.host,
            port,
            "plain-text gRPC on a non-loopback address: anyone who can reach it can use and read it; "
            "give --tls-cert/--tls-key",
        )
    return App(config, server, port, health_servicer, calls, servicer, inference, metrics, pool, metrics_server, worker)


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """Every served service's .proto in one pool for reflection: the Open Inference Protocol's
    stubs live in a pool of their own (scripts/gen-protos.sh says why), the others in the default."""
    pool = descriptor_pool.DescriptorPool()
    for file in (pb.DESCRIPTOR, oip_pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        pool.AddSerializedFile(file.serialized_pb)
    return pool


def _credentials(config: ServerConfig) -> grpc.ServerCredentials:
    """Server TLS; with a client CA, mutual TLS (clients must present a certificate it signed).

    The files are checked with Python's ssl first: gRPC itself only says "Failed to bind"."""
    if not config.tls_key:
        raise OSError("TLS needs both a certificate and its private key (--tls-cert and --tls-key)")
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        check.load_cert_chain(config.tls_cert, config.tls_key)
    except ssl.SSLError as exc:
        raise OSError(
            f"{config.tls_cert} and {config.tls_key} are not a matching PEM certificate and key: {exc}"
        ) from None
    if config.tls_client_ca:
        try:
            check.load_verify_locations(config.tls_client_ca)
        except ssl.SSLError as exc:
            raise OSError(f"{config.tls_client_ca} is not a PEM CA certificate: {exc}") from None
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _check_bindable(host: str, port: int) -> None:
    """Refuse a port in use (or an address not on this machine) with our own one-line error: gRPC
    would also print its own `add_port.cc` error line first. A later race is still caught by gRPC."""
    if not port:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return  # gRPC says what is wrong with the name
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                    raise OSError(f"cannot bind {host}:{port}: {exc.strerror}") from None
                raise


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


async def run(config: ServerConfig, worker: Worker | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain. Raises ModelLoadError if a model cannot load."""
    return_large_blocks_to_the_system()
    app = await create_app(config, worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("event=signal signal=%s already_draining=%s", sig.name, stop.is_set())
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    failed = False
    try:
        loader = asyncio.create_task(app.load() if worker is None else _load_worker(app, worker))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({loader, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if loader.done():
            failed = loader.exception() is not None
            loader.result()  # a load failure ends the process with its message, and only that
            await stopped
        else:
            loader.cancel()
    finally:
        await (app.close() if failed else app.stop())


async def _load_worker(app: App, worker: Worker) -> None:
    """A worker: load, start listening, tell the supervisor, and turn SERVING only once every
    worker is ready (health says NOT_SERVING until the whole server can take its load)."""
    await app.load_models()
    await app.server.start()
    worker.ready.put((worker.index, "ready"))
    loop = asyncio.get_running_loop()
    while not await loop.run_in_executor(None, worker.all_ready.wait, 0.5):
        pass
    await app.serving()
    worker.ready.put((worker.index, "serving"))
