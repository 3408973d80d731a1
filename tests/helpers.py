"""What tests import: the shared data's paths, request builders, the card's reference pipeline,
the one way to start a server (in-process for most tests, a child process for those that need
its memory, signals or exit code), and the seams that let a test decide when work happens: a
fake model for the transport (`FakeModel`, `start_fake_server`: no model file, no onnxruntime
run) and a gate on a real model's sessions (`SessionGate`). Fixtures live in conftest.py."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mobiserve.bench import servers
from mobiserve.bench.servers import ServerProcess, free_port
from mobiserve.common import command
from mobiserve.common.labels import Labels
from mobiserve.server.app import App, create_app, load_model
from mobiserve.server.config import ModelConfig, ServerConfig
from mobiserve.server.runtime.model import Model
from mobiserve.server.runtime.session import SessionTuning, open_session
from mobiserve.server.serving import (
    INTERACTIVE,
    Classified,
    ImageInput,
    ImageScores,
    ModelDescription,
    ModelRegistry,
    Timing,
)
from mobiserve.v1 import classifier_pb2 as pb

__all__ = ["ServerProcess", "free_port"]

SHARED = Path(os.environ.get("MOBISERVE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
INT8 = SHARED / "models" / "mobilenetv2-12-int8.onnx"
FP32 = SHARED / "models" / "mobilenetv2-12-fp32-dequant.onnx"
SYNSETS = SHARED / "data" / "imagenet-synsets.txt"
SAMPLE = SHARED / "data" / "imagenet-sample"
MOBISERVE = str(Path(sys.executable).parent / "mobiserve")

_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test data missing: {path} (tests read ../shared beside the project; see README)")
    return path


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def card_pipeline(path_or_bytes: Path | bytes) -> np.ndarray:
    """The model card's preprocessing, written out plainly with Pillow: the reference we must match.
    (Written here again, not taken from the product, so that the oracle is independent of it.)"""
    data = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR)
    w, h = im.size
    left, top = (w - 224) // 2, (h - 224) // 2
    crop = np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32)
    return ((crop / 255 - _MEAN) / _STD).transpose(2, 0, 1)


def request_of(*images: bytes, **fields: Any) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(images=[pb.Image(encoded=b) for b in images], **fields)


def model_config(path: Path, name: str = "int8", **knobs: Any) -> ModelConfig:
    return ModelConfig(name=name, path=str(path), synsets=str(require(SYNSETS)), **knobs).resolved()


async def start_server(*models: ModelConfig, gates: Mapping[str, SessionGate] | None = None, **settings: Any) -> App:
    """A real server in this process on an ephemeral 127.0.0.1 port, models loaded and warm.
    gates: model name -> the gate its sessions run behind (they start open)."""
    app = await create_app(ServerConfig(models=models, host="127.0.0.1", port=0, **settings))
    held = dict(gates or {})

    def load(config: ModelConfig) -> Model:
        gate = held.get(config.name)
        return load_model(config) if gate is None else load_model(config, gate.open_session)

    await app.load(load)
    for gate in held.values():
        gate.batch_sizes.clear()  # the warm-up's runs are not the test's
    return app


async def start_fake_server(*models: FakeModel, **settings: Any) -> App:
    """A real server in this process on an ephemeral 127.0.0.1 port (gRPC, both services, the
    call handling they share, health, drain) serving fake models: the first is the default."""
    configs = tuple(ModelConfig(name=m.name, path=m.description.path) for m in models)
    app = await create_app(ServerConfig(models=configs, host="127.0.0.1", port=0, **settings))
    app.handling.registry = ModelRegistry(models, configs[0].name)
    await app.serving()
    return app


@dataclass(frozen=True)
class Arrival:
    """One classify call a fake model got."""

    images: int
    deadline: float | None  # time.monotonic()
    lane: str = INTERACTIVE


class FakeModel:
    """A `Servable` with no model behind it: it answers every image with the same scores (the last
    class first) once `gate` is open, which it is until a test clears it, or raises
    `fails_with()` when that is set. It records each call (`arrivals`) and how many waited at once."""

    def __init__(self, name: str = "fake", classes: int = 10):
        labels = Labels(tuple(f"n{i:08d}" for i in range(classes)), tuple(f"class {i}" for i in range(classes)))
        self.description = ModelDescription(
            name=name,
            version="1",
            input_name="input",
            input_shape=(-1, 3, 224, 224),
            input_dtype="float32",
            output_name="output",
            num_classes=classes,
            labels=labels,
            preprocessing="none: a fake model",
            max_batch_size=1,
            max_queue_delay_ms=0.0,
            max_queue_size=0,
            instances=1,
            intra_op_threads=1,
            path=f"{name}.onnx",
            sha256="",
        )
        logits = np.arange(classes, dtype=np.float32)
        probabilities = np.exp(logits) / np.exp(logits).sum()
        self._scores = ImageScores(logits, probabilities.astype(np.float32), np.argsort(-logits))
        self.gate = asyncio.Event()
        self.gate.set()
        self.fails_with: Callable[[], Exception] | None = None
        self.arrivals: list[Arrival] = []
        self.waiting = 0
        self.most_waiting = 0

    @property
    def name(self) -> str:
        return self.description.name

    async def classify(
        self, images: Sequence[ImageInput], deadline: float | None = None, lane: str = INTERACTIVE, wait: bool = False
    ) -> Classified:
        self.arrivals.append(Arrival(len(images), deadline, lane))
        if self.fails_with is not None:
            raise self.fails_with()
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        timing = Timing(queue_us=0, preprocess_us=0, inference_us=0, batch_size=len(images), lane=lane)
        return Classified(self.name, [self._scores] * len(images), timing, self.description.labels)

    def has_room(self, lane: str) -> bool:
        return True  # no lanes: nothing waits for room

    async def room(self, lane: str) -> None:
        """Always room."""


class SessionGate:
    """A gate in front of the onnxruntime sessions a real model opens (pass `open_session` to the
    model, or the model's name and this gate to `start_server`), so a test decides when a batch
    runs; `fail_next` makes the next run fail inside onnxruntime itself (it gets a batch of the
    wrong shape). Runs happen in the model's inference threads, hence threading events."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a run is waiting at (or went through) the gate
        self.held = 0  # runs waiting at the gate now (a model's regular and spare sessions both can)
        self._count = threading.Lock()
        self.batch_sizes: list[int] = []
        self.fail_next = False

    def open_session(self, path: str, tuning: SessionTuning) -> ort.InferenceSession:
        return _GatedSession(open_session(path, tuning), self)

    def run(self, session: Any, output_names: list[str], feeds: dict[str, np.ndarray]) -> Any:
        with self._count:
            self.held += 1
        self.entered.set()
        try:
            if not self.gate.wait(120):
                raise TimeoutError("test gate never opened")
        finally:
            with self._count:
                self.held -= 1
        ((name, batch),) = feeds.items()
        self.batch_sizes.append(len(batch))
        if self.fail_next:
            self.fail_next = False
            batch = np.ascontiguousarray(batch[:, :, :100, :])
        return session.run(output_names, {name: batch})

    @contextlib.contextmanager
    def closed(self) -> Iterator[None]:
        """Hold every run at the gate for the block; always reopen it."""
        self.entered.clear()
        self.gate.clear()
        try:
            yield
        finally:
            self.gate.set()

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 120), "no batch reached the session"

    async def wait_held(self, runs: int) -> None:
        """Until `runs` runs wait at the gate (every session busy: the regular and the spare one)."""
        await poll_until(lambda: self.held >= runs, timeout_s=120)


class _GatedSession:
    """An onnxruntime session whose runs go through a SessionGate."""

    def __init__(self, session: Any, gate: SessionGate):
        self._session = session
        self._gate = gate

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> Any:
        return self._gate.run(self._session, output_names, feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def png_bomb(side: int = 30000) -> bytes:
    """A PNG whose header claims side x side pixels, with only a few rows of data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (side * 3 + 1) * 4)
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def requests_counted(app: App, code: str, method: str = "Classify", model: str = "int8") -> float:
    """The in-process server's own count of requests answered with `code`."""
    labels = {"model": model, "method": method, "code": code}
    return app.metrics.registry.get_sample_value("mobiserve_requests_total", labels) or 0.0


async def status_of_call(call: Awaitable[Any]) -> grpc.StatusCode:
    """How a gRPC call ended."""
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def serve(
    *args: str, host: str = "127.0.0.1", timeout: float = 120, env: dict[str, str] | None = None
) -> ServerProcess:
    """`mobiserve serve ARGS` as a child process on `host`, port 0 unless ARGS name one; returns
    once it is serving. Blocking: call it through asyncio.to_thread from async tests."""
    return servers.start(
        servers.serve_command(*args, host=host), host=host, what="mobiserve serve", timeout=timeout, env=env
    )


def run(*args: str, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    """The `mobiserve` command, as a user runs it."""
    done: subprocess.CompletedProcess[str] = subprocess.run(
        [MOBISERVE, *args], capture_output=True, text=True, timeout=timeout, **kw
    )
    return done


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`mobiserve ARGS` in this process, as a user runs it but without starting Python again:
    (exit code, stdout, stderr). From an async test whose server runs in this process, call it
    through asyncio.to_thread."""
    try:
        code = command.main(list(args))
    except SystemExit as exc:  # argparse's usage errors and --help
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def threads_of(pid: int) -> int:
    """Threads of a process now (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise OSError(f"no Threads in /proc/{pid}/status")


def tcp_connections(port: int) -> list[tuple[int, int, str]]:
    """TCP sockets on this machine with `port` at either end: (local port, remote port, state).

    Read from /proc/net/tcp and tcp6 (gRPC's IPv4 sockets are often IPv6 ones with mapped
    addresses): what the kernel holds, whichever process owns it."""
    states = {"01": "ESTABLISHED", "08": "CLOSE_WAIT", "04": "FIN_WAIT1", "05": "FIN_WAIT2", "06": "TIME_WAIT"}
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
                if port in (local, remote):
                    found.append((local, remote, states.get(fields[3], fields[3])))
    return found


def metric(host: str, port: int, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`, read from the
    Prometheus endpoint a server serves on `host:port` (--metrics-port): what that one process
    counted, whoever its clients were."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def poll_until(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.02) -> None:
    """Return once `condition()` holds; fail the test if it still does not after `timeout_s`
    (a deadline far above what any machine needs: the test waits on the state, not on the clock)."""
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"still not true after {timeout_s} s: {getattr(condition, '__name__', condition)}")
        await asyncio.sleep(every_s)
