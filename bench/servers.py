"""Servers as child processes: `mobiserve serve` and the unbatched comparison server.

The one way the harness (and the test suite) starts a server: a child process on 127.0.0.1,
port 0 unless told, whose port and readiness come from its own structured log lines
(`event=listening address=...:PORT`, then `event=serving`) rather than from polling. Its log is
kept in memory and, when asked, written to a file as it comes. Stopped with SIGTERM (then
SIGKILL) when the context ends.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from mobiserve.bench.loadgen import BenchError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_MOBISERVE = "from mobiserve.common.command import main; raise SystemExit(main())"
_LISTENING = re.compile(r"event=listening address=\S+:(\d+)")


def is_local(target: str) -> bool:
    return target.rpartition(":")[0] in LOCAL_HOSTS


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A running server child process and what it has logged so far."""

    proc: subprocess.Popen[str]
    host: str = "127.0.0.1"
    port: int = 0
    lines: list[str] = field(default_factory=list)  # its stderr, as it comes
    _serving: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def rss_bytes(self) -> int:
        """Resident memory of the server process now (Linux /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise OSError(f"no VmRSS in /proc/{self.pid}/status")

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        return code

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (a drain), then SIGKILL if it has not exited within `timeout`."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def _read(self, out: IO[str] | None) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if out is not None:
                out.write(line)
                out.flush()
            if not self.port and (m := _LISTENING.search(line)):
                self.port = int(m.group(1))
            if "event=serving" in line:
                self._serving.set()
        self._serving.set()  # exited: wake the waiter, which then sees it


def start(
    cmd: Sequence[str],
    *,
    host: str = "127.0.0.1",
    what: str = "the server",
    log: Path | None = None,
    timeout: float = 180,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start `cmd` (a server that logs `event=listening` and `event=serving`); return once it serves."""
    out = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = log.open("w")
    proc = subprocess.Popen(
        list(cmd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    server = ServerProcess(proc, host)
    server._reader = threading.Thread(target=server._read, args=(out,), name="server-log", daemon=True)
    server._reader.start()
    try:
        serving = server._serving.wait(timeout)
    except BaseException:  # Ctrl-C while it starts: it is not left running
        server.kill()
        raise
    if not serving or proc.poll() is not None or not server.port:
        server.kill()
        state = (
            f"exited with code {proc.returncode}" if proc.poll() is not None else f"not serving after {timeout:.0f} s"
        )
        tail = "\n  ".join(server.log.strip().splitlines()[-8:])
        raise BenchError(f"{what} {state}; its last lines:\n  {tail}")
    return server


def serve_command(*serve_args: str, host: str = "127.0.0.1", port: int = 0) -> list[str]:
    """`mobiserve serve` on `host:port` with this Python (port 0: a free one, read from its log)."""
    return [sys.executable, "-c", _MOBISERVE, "serve", "--host", host, "--port", str(port), *serve_args]


@contextmanager
def mobiserve_server(serve_args: Sequence[str], log: Path | None = None) -> Iterator[ServerProcess]:
    """`mobiserve serve SERVE_ARGS` on a free 127.0.0.1 port, for the duration of the block."""
    taken = {"--host", "--port"} & {a.partition("=")[0] for a in serve_args}
    if taken:
        raise BenchError(f"--serve picks the address itself; drop {', '.join(sorted(taken))} from its arguments")
    # the comparisons load the same model file, which ListModels names in full only on this opt-in
    server = start(serve_command("--expose-model-paths", *serve_args), what="mobiserve serve", log=log)
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def unbatched_server(model: str, log: Path | None = None) -> Iterator[ServerProcess]:
    """The plain comparison server (`unbatched.py`) serving `model` on a free 127.0.0.1 port."""
    cmd = [sys.executable, "-m", "mobiserve.bench.unbatched", "--model", model, "--port", "0"]
    server = start(cmd, what="the unbatched server", log=log)
    try:
        yield server
    finally:
        server.stop()
