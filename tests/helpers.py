"""What tests import: the shared data's paths, request builders, the card's reference pipeline,
and the one way to start a server (in-process for most tests, a child process for those that
need its memory, signals or exit code). Fixtures live in conftest.py."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from mobiserve.bench import servers
from mobiserve.bench.servers import ServerProcess, free_port
from mobiserve.common import command
from mobiserve.server.app import App, create_app
from mobiserve.server.config import ModelConfig, ServerConfig
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
    image.save(buf, format=fmt, **params)  # type: ignore[arg-type]
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


def request_of(*images: bytes, **fields: object) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(images=[pb.Image(encoded=b) for b in images], **fields)  # type: ignore[arg-type]


def model_config(path: Path, name: str = "int8", **knobs: object) -> ModelConfig:
    return ModelConfig(name=name, path=str(path), synsets=str(require(SYNSETS)), **knobs).resolved()  # type: ignore[arg-type]


async def start_server(*models: ModelConfig, **settings: object) -> App:
    """A real server in this process on an ephemeral 127.0.0.1 port, models loaded and warm."""
    app = await create_app(ServerConfig(models=models, host="127.0.0.1", port=0, **settings))  # type: ignore[arg-type]
    await app.load()
    return app


def serve(
    *args: str, host: str = "127.0.0.1", timeout: float = 120, env: dict[str, str] | None = None
) -> ServerProcess:
    """`mobiserve serve ARGS` as a child process on `host`, port 0 unless ARGS name one; returns
    once it is serving. Blocking: call it through asyncio.to_thread from async tests."""
    return servers.start(
        servers.serve_command(*args, host=host), host=host, what="mobiserve serve", timeout=timeout, env=env
    )


def run(*args: str, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    """The `mobiserve` command, as a user runs it."""
    return subprocess.run([MOBISERVE, *args], capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


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
