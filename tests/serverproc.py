"""`mobiserve serve` as a subprocess, for tests that need a real process: its memory, its signals,
its exit code. Readiness and the port come from its own structured log lines, not from polling."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

MOBISERVE = str(Path(sys.executable).parent / "mobiserve")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)  # its stderr, as it comes
    port: int = 0
    _serving: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def rss_bytes(self) -> int:
        """Resident memory of the server process now (Linux /proc)."""
        return int(self._status("VmRSS:").split()[0]) * 1024

    def threads(self) -> int:
        """Threads of the server process now (Linux /proc)."""
        return int(self._status("Threads:"))

    def _status(self, key: str) -> str:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return line[len(key) :].strip()
        raise AssertionError(f"no {key} in /proc status")

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 120) -> int:
        code = self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if not self.port and (m := re.search(r"event=listening address=\S+:(\d+)", line)):
                self.port = int(m.group(1))
            if "event=serving" in line:
                self._serving.set()
        self._serving.set()  # exited: wake the waiter, which then sees it


def start(*args: str, timeout: float = 120) -> ServerProcess:
    """Start `mobiserve serve --port 0 ARGS` on 127.0.0.1; return once its models are serving.

    Blocking: call it through asyncio.to_thread from async tests."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [MOBISERVE, "serve", "--host", "127.0.0.1", "--port", "0", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    server = ServerProcess(proc)
    server._reader = threading.Thread(target=server._read, name="server-log", daemon=True)
    server._reader.start()
    if not server._serving.wait(timeout) or proc.poll() is not None or not server.port:
        server.kill()
        raise AssertionError(f"server did not start serving:\n{server.log[-3000:]}")
    return server
