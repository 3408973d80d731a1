"""`mobiserve serve --workers N`: N server processes on one port, and the parent that keeps them.

One Python process holds the GIL for about a millisecond of every image (the event loop, the
parts of preprocessing that hold it), so it cannot use a many-core Xeon however many threads it
runs. Each worker is a whole server (event loop, batchers, sessions) on its share of the cores,
bound to the same port with SO_REUSEPORT: the kernel spreads *connections*, not requests, over
the workers, so a client needs several connections to use them all (`Client(connections=N)`).

The parent (this module, on its own event loop):
- reserves the port (a socket bound with SO_REUSEPORT that never listens, so `--port 0` works and
  no other program takes the port between two workers' binds);
- starts the workers (multiprocessing, spawned), each told its share of the cores through
  $MOBISERVE_CORES and, with `pin_cpus`, pinned to those cores;
- turns health SERVING in every worker only once all of them are ready (a shared event);
- restarts a worker that dies, after a backoff that grows while it keeps dying (logged,
  counted in `mobiserve_worker_restarts_total`);
- on SIGTERM/SIGINT stops restarting, forwards the signal so that every worker drains, and
  exits 0 once all have exited 0;
- serves the metrics of all workers on `--metrics-port` with prometheus-client's multiprocess
  mode (each worker writes its samples to files in a folder; the parent's collector sums them).
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import dataclasses
import fcntl
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event
from typing import Any

from mobiserve.server.config import ServerConfig
from mobiserve.server.cores import CORES_ENV, available_cores

log = logging.getLogger("mobiserve.server")

CORES_PER_WORKER = 4  # `--workers auto`: one worker per this many cores (one session of 4 threads)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own switch to multiprocess mode
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # before the 1st, 2nd, ... restart in a row
STABLE_S = 60.0  # a worker up this long starts its backoff from the beginning again
EXIT_STARTUP_FAILED = 3  # a worker's exit code when its models cannot load: restarting would not help
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies


def auto_workers(cores: int | None = None) -> int:
    return max(1, (cores or available_cores()) // CORES_PER_WORKER)


@dataclass
class _Worker:
    index: int
    cpus: tuple[int, ...]  # pinned to these, or () for no pinning
    process: SpawnProcess | None = None
    started: float = 0.0
    failures: int = 0  # deaths in a row, for the backoff
    restart_at: float | None = None


@dataclass
class Supervisor:
    config: ServerConfig
    workers: int
    log_level: str = "INFO"
    _ctx: Any = field(default_factory=lambda: mp.get_context("spawn"))
    _slots: list[_Worker] = field(default_factory=list)
    _failure: str = ""

    async def run(self) -> int:
        """Serve until a signal, then drain every worker. Returns the exit code."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig, stop)
        with tempfile.TemporaryDirectory(prefix="mobiserve-metrics-") as metrics_dir, _reserve(self.config) as port:
            os.environ[MULTIPROC_ENV] = metrics_dir  # before prometheus_client is imported, here and in workers
            from prometheus_client import CollectorRegistry, Counter

            from mobiserve.server.metric_files import WorkerMetricFiles
            from mobiserve.server.metrics_http import MetricsServer

            restarts = Counter("mobiserve_worker_restarts", "Worker processes restarted after they died.")
            config = dataclasses.replace(self.config, port=port, metrics_port=0, workers=1)
            all_ready: Event = self._ctx.Event()
            ready: Any = self._ctx.Queue()
            metrics_server = None
            registry = CollectorRegistry() if self.config.metrics_port else None
            files = WorkerMetricFiles(metrics_dir, registry)
            if registry is not None:
                metrics_server = MetricsServer(registry)
                metrics_port = await metrics_server.start(self.config.host, self.config.metrics_port)
            log.info(
                "event=listening address=%s:%d workers=%d metrics_port=%d",
                self.config.host,
                port,
                self.workers,
                metrics_port if metrics_server else 0,
            )
            self._slots = [_Worker(i, cpus) for i, cpus in enumerate(_cpu_shares(self.workers, self.config.pin_cpus))]
            for slot in self._slots:
                self._start(slot, config, all_ready, ready)
            waiting = {"ready": set(range(self.workers)), "serving": set(range(self.workers))}
            while not stop.is_set():
                await self._tick(config, all_ready, ready, waiting, restarts, files)
                if not waiting["ready"] and not all_ready.is_set():
                    all_ready.set()  # each worker turns SERVING now
                if not waiting["serving"]:
                    waiting["serving"] = {-1}  # said once
                    log.info("event=serving port=%d workers=%d", port, self.workers)
                if self._failure:
                    break
                try:
                    await asyncio.wait_for(stop.wait(), 0.2)
                except TimeoutError:
                    pass
            code = await self._drain()
            if metrics_server is not None:
                await metrics_server.close()
        log.info("event=stopped workers=%d", self.workers)
        if self._failure:
            print(f"mobiserve: error: {self._failure}", file=sys.stderr)
            return 1
        return code

    def _on_signal(self, sig: signal.Signals, stop: asyncio.Event) -> None:
        log.info("event=signal signal=%s already_draining=%s", sig.name, stop.is_set())
        stop.set()

    def _start(self, slot: _Worker, config: ServerConfig, all_ready: Event, ready: Any) -> None:
        os.environ[CORES_ENV] = str(len(slot.cpus) if slot.cpus else _share(self.workers))
        try:
            slot.process = self._ctx.Process(
                target=_worker_main,
                args=(config, slot.index, slot.cpus, all_ready, ready, self.log_level, os.getpid()),
                name=f"mobiserve-worker-{slot.index}",
            )
            slot.process.start()
        finally:
            del os.environ[CORES_ENV]
        slot.started, slot.restart_at = time.monotonic(), None
        log.info("event=worker_started worker=%d pid=%d cpus=%s", slot.index, slot.process.pid, _cpus(slot.cpus))

    async def _tick(
        self,
        config: ServerConfig,
        all_ready: Event,
        ready: Any,
        waiting: dict[str, set[int]],
        restarts: Any,
        files: Any,
    ) -> None:
        while not ready.empty():
            index, message = ready.get_nowait()
            if message in waiting:  # "ready" (loaded, listening), then "serving" (health SERVING)
                waiting[message].discard(index)
            else:  # its models cannot load: the same config will not load them on a restart either
                self._failure = message
        now = time.monotonic()
        for slot in self._slots:
            process = slot.process
            if process is not None and process.exitcode is not None:
                await asyncio.get_running_loop().run_in_executor(None, files.process_dead, process.pid)
                slot.process = None
                if process.exitcode == EXIT_STARTUP_FAILED and not all_ready.is_set():
                    self._failure = self._failure or f"worker {slot.index} could not start"
                    continue
                slot.failures = 1 if now - slot.started > STABLE_S else slot.failures + 1
                delay = BACKOFF_S[min(slot.failures, len(BACKOFF_S)) - 1]
                slot.restart_at = now + delay
                log.warning(
                    "event=worker_exited worker=%d pid=%d code=%s restart_in_s=%.0f",
                    slot.index,
                    process.pid,
                    process.exitcode,
                    delay,
                )
            if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
                restarts.inc()
                self._start(slot, config, all_ready, ready)

    async def _drain(self) -> int:
        """Forward SIGTERM to every worker and wait for all of them; 0 if all exited 0."""
        alive = [s.process for s in self._slots if s.process is not None]
        for process in alive:
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        codes = [await loop.run_in_executor(None, _join, process) for process in alive]
        for process, code in zip(alive, codes):
            log.info("event=worker_stopped pid=%d code=%s", process.pid, code)
        return 0 if all(code == 0 for code in codes) else 1


def _join(process: SpawnProcess) -> int | None:
    process.join()
    return process.exitcode


def _worker_main(
    config: ServerConfig, index: int, cpus: tuple[int, ...], all_ready: Event, ready: Any, log_level: str, parent: int
) -> None:
    """A worker process: a whole server on the shared port; health SERVING once all are ready."""
    _bind_to(parent, index)
    if cpus:
        os.sched_setaffinity(0, cpus)
    from mobiserve.server import app
    from mobiserve.server.errors import ModelLoadError
    from mobiserve.server.handshake import Handshake
    from mobiserve.server.logs import configure

    configure(log_level, worker=index)
    try:
        asyncio.run(app.run(config, Handshake(index, all_ready, ready)))
    except ModelLoadError as exc:
        ready.put((index, str(exc)))
        sys.exit(EXIT_STARTUP_FAILED)


def _bind_to(parent: int, index: int) -> None:
    """Make this worker end with its supervisor, however that ends (a SIGKILL leaves it no time to
    stop its workers, which would keep serving and keep the port): SIGTERM when it dies, and the
    worker drains (Linux's PR_SET_PDEATHSIG). The last worker out then removes the metric files'
    folder: a shared lock on it, held while the worker lives, says who is still there."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # until the server's own handler: exit cleanly
    if sys.platform.startswith("linux"):
        # It comes when the *thread* that started this process ends: the supervisor starts its
        # workers on its main thread (its event loop), which ends only with the process.
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    folder = os.open(os.environ[MULTIPROC_ENV], os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(folder, fcntl.LOCK_SH)
    atexit.register(_leave, folder, parent, index)
    if os.getppid() != parent:
        sys.exit(0)  # it died before this worker asked to hear of it


def _leave(folder: int, parent: int, index: int) -> None:
    """At a worker's exit: if its supervisor is gone and no other worker holds the folder's lock,
    remove the folder, as the supervisor would have."""
    try:
        if os.getppid() == parent:
            return  # the supervisor removes it when it exits
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another worker is still there, and will
        shutil.rmtree(os.environ[MULTIPROC_ENV], ignore_errors=True)
        log.warning("event=supervisor_gone worker=%d removed=%s", index, os.environ[MULTIPROC_ENV])
    finally:
        os.close(folder)


class _reserve:
    """The shared port, held by a bound, never-listening SO_REUSEPORT socket for the whole run."""

    def __init__(self, config: ServerConfig):
        family = socket.AF_INET6 if ":" in config.host.strip("[]") else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self._socket.bind((config.host.strip("[]"), config.port))
        except OSError as exc:
            self._socket.close()
            raise OSError(f"cannot bind {config.host}:{config.port}: {exc.strerror or exc}") from None

    def __enter__(self) -> int:
        return int(self._socket.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self._socket.close()


def _share(workers: int) -> int:
    return max(1, available_cores() // workers)


def _cpu_shares(workers: int, pin: bool) -> list[tuple[int, ...]]:
    """Each worker's cores when pinning (consecutive runs of the allowed CPUs), else ()."""
    if not pin:
        return [() for _ in range(workers)]
    cpus = sorted(os.sched_getaffinity(0))
    per = max(1, len(cpus) // workers)
    return [tuple(cpus[(i * per) % len(cpus) :][:per]) for i in range(workers)]


def _cpus(cpus: Sequence[int]) -> str:
    return ",".join(map(str, cpus)) or "any"
