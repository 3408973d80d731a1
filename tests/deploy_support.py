"""Helpers for the deployment tests: run a command that ends in `mobiserve serve` (the container's
entrypoint, a replica on its own loopback address), read its log, wait for SERVING; ask a health
service; read a Prometheus counter."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """A process whose stderr is mobiserve's structured log."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    serving: bool = False  # its log said event=serving
    _changed: threading.Event = field(default_factory=threading.Event)  # serving, or the log ended
    _exited: threading.Event = field(default_factory=threading.Event)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_serving(self, timeout: float = 90) -> None:
        """Until the log says `event=serving`; fails with the log if the process exits first."""
        self._changed.wait(timeout)
        if not self.serving or self._exited.is_set():
            self.kill()
            raise AssertionError(f"not serving after {timeout} s (exit {self.proc.poll()}):\n{self.log[-3000:]}")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (a drain), then the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._exited.wait(timeout)
        return code

    def wait(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self._exited.wait(timeout)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "event=serving" in line:
                self.serving = True
                self._changed.set()
        self._exited.set()
        self._changed.set()  # the log ended: wake the waiter, which then sees it


def spawn(argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path | None = None) -> Served:
    """Start `argv` with `env` added to this environment; stdout is dropped, stderr is read."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        cwd=cwd,
    )
    served = Served(proc)
    threading.Thread(target=served._read, name="served-log", daemon=True).start()
    return served


def health_status(target: str, service: str = "", timeout: float = 3) -> str:
    """The health service's answer (SERVING, NOT_SERVING, ...) or the gRPC error's code name."""
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def metrics_text(host: str, port: int, timeout: float = 5) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as reply:
        return str(reply.read().decode())


def counter_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        m = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total
