"""Servers the harness starts itself: `mobiserve serve` and the unbatched comparison server.

Each runs as a child process on a free 127.0.0.1 port, its output in a log file of the report
folder; the harness waits for gRPC health SERVING, and stops it with SIGTERM (then SIGKILL) on exit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mobiserve.client.bench.loadgen import BenchError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_SERVE = "from mobiserve.server.cli import main; raise SystemExit(main())"


@dataclass(frozen=True)
class Managed:
    target: str
    pid: int
    log: Path


def is_local(target: str) -> bool:
    return target.rpartition(":")[0] in LOCAL_HOSTS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mobiserve_server(serve_args: Sequence[str], log: Path) -> Iterator[Managed]:
    """`mobiserve serve SERVE_ARGS` on a free 127.0.0.1 port."""
    taken = {"--host", "--port"} & {a.partition("=")[0] for a in serve_args}
    if taken:
        raise BenchError(f"--serve picks the address itself; drop {', '.join(sorted(taken))} from its arguments")
    port = free_port()
    cmd = [sys.executable, "-c", _SERVE, "serve", "--host", "127.0.0.1", "--port", str(port), *serve_args]
    with _child(cmd, port, log, "mobiserve serve") as managed:
        yield managed


@contextmanager
def unbatched_server(model: str, log: Path) -> Iterator[Managed]:
    """The plain comparison server (`unbatched.py`) serving `model`."""
    port = free_port()
    cmd = [sys.executable, "-m", "mobiserve.client.bench.unbatched", "--model", model, "--port", str(port)]
    with _child(cmd, port, log, "the unbatched server") as managed:
        yield managed


@contextmanager
def _child(cmd: list[str], port: int, log: Path, what: str, ready_s: float = 180) -> Iterator[Managed]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        target = f"127.0.0.1:{port}"
        _wait_serving(target, proc, ready_s, what, log)
        yield Managed(target, proc.pid, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_serving(target: str, proc: subprocess.Popen[bytes], limit: float, what: str, log: Path) -> None:
    end = time.monotonic() + limit
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while proc.poll() is None and time.monotonic() < end:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    tail = log.read_text(errors="replace").strip().splitlines()[-5:]
    state = f"exited with code {proc.returncode}" if proc.poll() is not None else f"not SERVING after {limit:.0f} s"
    raise BenchError(f"{what} {state}; last lines of {log}:\n  " + "\n  ".join(tail))


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads) from /proc; None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
