"""Wires config -> models -> batchers -> grpc.aio server, and runs it until a signal.

Start-up order matters to callers: the port is bound and health answers NOT_SERVING at once;
models load and warm up in a worker thread; only then does health turn SERVING.
Shutdown (SIGTERM/SIGINT): health NOT_SERVING, stop taking RPCs, answer everything queued and in
flight within the grace period, then close the batchers and exit 0.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mobiserve.common.labels import Labels
from mobiserve.server import threads
from mobiserve.server.batching import Ran
from mobiserve.server.binding import bind, check_bindable, is_loopback
from mobiserve.server.config import ModelConfig, ServerConfig
from mobiserve.server.cores import CoreLedger, machine_cores, preprocess_threads
from mobiserve.server.handshake import Handshake
from mobiserve.server.memory import return_large_blocks_to_the_system
from mobiserve.server.metrics import Metrics
from mobiserve.server.metrics_http import MetricsServer
from mobiserve.server.processing.preprocess import ImageLimits
from mobiserve.server.runtime.model import Model, SessionOpener
from mobiserve.server.runtime.session import SessionTuning, open_session
from mobiserve.server.serving import INTERACTIVE, LANES, ModelRegistry, ServedModel
from mobiserve.server.tls import server_credentials
from mobiserve.server.transport import servicer as classifier
from mobiserve.server.transport.calls import CallHandling
from mobiserve.server.transport.connections import connection_options
from mobiserve.server.transport.drain import HANDOFF_MAX_S
from mobiserve.server.transport.health import HealthServicer
from mobiserve.server.transport.oip import servicer as oip
from mobiserve.server.transport.reflection import enable_reflection
from mobiserve.server.upkeep import Upkeep

log = logging.getLogger("mobiserve.server")
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
SERVICES = (classifier.SERVICE.full_name, oip.SERVICE.full_name)  # what health reports on, besides the server ("")
ModelLoader = Callable[[ModelConfig, CoreLedger], Model]


SPARE_SESSIONS = 1  # per model: narrow sessions only interactive work takes, so that it runs beside bulk batches


def load_model(
    config: ModelConfig, ledger: CoreLedger | None = None, open_session: SessionOpener = open_session
) -> Model:
    """Blocking: open the sessions (the regular ones, the spare ones, the all-core path) and warm them up."""
    labels = Labels.load(config.synsets)
    tuning = SessionTuning(intra_op_threads=config.intra_op_threads, allow_spinning=config.allow_spinning)
    model = Model(
        config.path, labels, tuning, config.instances + SPARE_SESSIONS, config.lone_threads, ledger, open_session
    )
    model.warm_up(config.max_batch_size)
    return model


@dataclass
class App:
    config: ServerConfig
    server: grpc.aio.Server
    port: int
    health: HealthServicer
    handling: CallHandling  # what both services share: registry, drain gate, metrics, error log
    servicer: classifier.ClassifierServicer
    inference: oip.InferenceServicer
    metrics: Metrics
    preprocess_pools: list[ThreadPoolExecutor]  # one per lane, shared by all models
    metrics_server: MetricsServer | None = None
    handshake: Handshake | None = None  # this process is a worker of `--workers N`
    served: list[ServedModel] = field(default_factory=list)
    upkeep: Upkeep | None = None

    async def load(self, load: ModelLoader | None = None) -> ModelRegistry:
        """Load and warm every model, then turn SERVING. Raises ModelLoadError on a bad model.
        `load` opens one model (tests pass one whose sessions they can hold)."""
        registry = await self.load_models(load)
        await self.serving()
        return registry

    async def load_models(self, load: ModelLoader | None = None) -> ModelRegistry:
        """Load and warm every model and take requests; health stays NOT_SERVING until `serving()`."""
        load = load or load_model
        loop = asyncio.get_running_loop()
        limits = ImageLimits(max_pixels=self.config.max_pixels)
        served = self.served
        shared = self.handshake
        ledger = CoreLedger(machine_cores(), *((shared.slots, shared.index) if shared and shared.slots else ()))
        for config in self.config.models:
            config = config.resolved()
            model = await loop.run_in_executor(None, load, config, ledger)
            served.append(
                ServedModel(
                    config,
                    model,
                    self.preprocess_pools,
                    limits,
                    self.config.max_images_per_request,
                    on_batch=functools.partial(self._observe_batch, config.name),
                    spare=SPARE_SESSIONS,
                    nice=self.config.bulk_nice,
                )
            )
            log.info(
                "event=model_loaded model=%s path=%s instances=%d intra_op_threads=%d lone_threads=%d "
                "max_batch_size=%d decode=%s",
                config.name,
                config.path,
                config.instances,
                config.intra_op_threads,
                config.lone_threads,
                config.max_batch_size,
                config.decode,
            )
        registry = ModelRegistry(served, self.config.default)
        for ready in served:
            ready.start()
            self.metrics.model_ready.labels(ready.name).set(1)
            log.info("event=model_ready model=%s", ready.name)
        self.upkeep = Upkeep(self.metrics, served, lambda: self.handling.answered)
        self.upkeep.start()
        self.handling.registry = registry
        return registry

    def _observe_batch(self, model: str, ran: Ran) -> None:
        self.metrics.observe_batch(model, ran.size, ran.seconds, ran.lane, ran.waits, ran.guarded)

    async def serving(self) -> None:
        """Health SERVING: load balancers and health-checking clients send calls from now on."""
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        registry = self.handling.models()
        event = "serving" if self.handshake is None else "worker_serving"  # the supervisor says "serving"
        log.info("event=%s port=%d models=%s default=%s", event, self.port, ",".join(registry.models), registry.default)

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
        gate = self.handling.gate
        self.handling.drain()
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
        if self.upkeep is not None:
            self.upkeep.stop()
        for model in self.served:
            await model.close()
            if not quiet:
                log.info("event=model_unloaded model=%s", model.name)
        for pool in self.preprocess_pools:
            pool.shutdown(wait=False, cancel_futures=True)
        self.handling.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()


async def create_app(config: ServerConfig, handshake: Handshake | None = None) -> App:
    """Bind and start the server (health NOT_SERVING); call `App.load()` next.

    A worker binds the port its supervisor holds (SO_REUSEPORT) but starts listening only once
    its models are loaded (`run` does), so that no connection lands on a worker still loading."""
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", int(handshake is not None)),
        *connection_options(config),
    ]
    metrics = Metrics()
    server = grpc.aio.server(options=options)
    for model in config.models:
        metrics.model_ready.labels(model.name).set(0)  # the series exists (at 0) while loading
    handling = CallHandling(
        metrics, config.default_timeout_s, (m.name for m in config.models), config.max_message_bytes
    )
    servicer = classifier.ClassifierServicer(handling, config.expose_model_paths)
    classifier.register(servicer, server)
    inference = oip.InferenceServicer(handling)
    oip.register(inference, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    enable_reflection(server, (classifier.SERVICE, oip.SERVICE, HEALTH))
    for name in ("", *SERVICES):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    credentials = server_credentials(config)
    if handshake is None:  # a worker's port is held by its supervisor
        check_bindable(config.host, config.port)
    port = bind(server, config.host, config.port, credentials)
    metrics_port, metrics_server = 0, None
    if config.metrics_port:
        metrics_server = MetricsServer(metrics.registry)
        try:
            metrics_port = await metrics_server.start(config.host, config.metrics_port)
        except OSError as exc:
            raise OSError(
                f"cannot serve metrics on {config.host}:{config.metrics_port}: {exc.strerror or exc}"
            ) from None
    if handshake is None:
        await server.start()
    threads.name_grpc_poller()
    pools = [  # bulk work's threads run below interactive work's (threads.py)
        ThreadPoolExecutor(
            config.preprocess_threads or preprocess_threads(),
            thread_name_prefix="preprocess",
            initializer=threads.pool_initializer(0 if lane == INTERACTIVE else config.bulk_nice),
        )
        for lane in LANES
    ]
    if handshake is None:  # a worker listens once its models are loaded: _load_as_worker says so then
        log.info("event=listening address=%s:%d tls=%s metrics_port=%d", config.host, port, _tls(config), metrics_port)
    if not credentials and not is_loopback(config.host):
        log.warning(
            "event=insecure_bind address=%s:%d message=%r",
            config.host,
            port,
            "plain-text gRPC on a non-loopback address: anyone who can reach it can use and read it; "
            "give --tls-cert/--tls-key",
        )
    return App(config, server, port, health, handling, servicer, inference, metrics, pools, metrics_server, handshake)


def _tls(config: ServerConfig) -> str:
    return "mutual" if config.tls_client_ca else "server" if config.tls_cert else "off"


async def run(config: ServerConfig, handshake: Handshake | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then drain. Raises ModelLoadError if a model cannot load."""
    return_large_blocks_to_the_system()
    app = await create_app(config, handshake)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("event=signal signal=%s already_draining=%s", sig.name, stop.is_set())
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    failed = False
    try:
        loader = asyncio.create_task(app.load() if handshake is None else _load_as_worker(app, handshake))
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


async def _load_as_worker(app: App, handshake: Handshake) -> None:
    """A worker: load, start listening, and turn SERVING only once every worker listens."""
    await app.load_models()
    await app.server.start()
    log.info("event=worker_listening address=%s:%d tls=%s", app.config.host, app.port, _tls(app.config))
    handshake.listening()
    await handshake.all_listening()
    await app.serving()
    handshake.serving()
