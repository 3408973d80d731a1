"""Where a process's CPU goes: per-thread CPU time from /proc by role, and GIL time from py-spy.

CPU: `/proc/<pid>/task/<tid>/stat` (utime + stime, clock ticks) of every thread, read at the
window's start and end; each thread's difference goes to its role, found from its OS name
(`/proc/<pid>/task/<tid>/comm`; the server names its threads, see `mobiserve.server.threads`):

    loop         the main thread (thread id = process id): the event loop (in-process: the harness)
    preprocess   preprocess_*                    the preprocessing pool
    inference    infer-*, infer_*, request_*     inference threads (request_*: the unbatched server's,
                                                 which preprocess too)
    onnxruntime  ort-*                           onnxruntime's intra-op pools
    grpc         grpc*, event_engine, lifeguard, default-executo, resolver-execu, timer_manager
    other        the rest (the start-up thread, OpenBLAS's idle pool, threads that ended during
                 the window: the process's total minus the live threads' sum)

The process's own total (`/proc/<pid>/stat`, which keeps the time of ended threads) is read too,
so the roles add up to it by construction. Resolution: one clock tick (10 ms) per thread per
reading, i.e. well under 0.01 ms per image over a window of a thousand images.

GIL: `py-spy record --gil --threads --nonblocking` on the process over the window (an optional dev
tool: `pip install py-spy`, needs ptrace rights over the process). With `--gil` py-spy records a
sample only when some thread holds the GIL, naming that thread; so the fraction of time the GIL
is held is samples / (rate x seconds sampled), and each sample's thread gives its role. It samples
without pausing the process, at `GIL_RATE` Hz: binomial error sqrt(p(1 - p) / n), about +-1
percentage point (one sigma) at p = 0.3 over 10 s; py-spy itself takes ~3% of one core.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROLES = ("loop", "preprocess", "inference", "onnxruntime", "grpc", "other")
GIL_RATE = 200  # Hz; at 1000 Hz py-spy falls behind and under-counts (measured on a known load)
_GRPC_NAMES = ("grpc", "event_engine", "lifeguard", "default-executo", "resolver-execu", "timer_manager")
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PY_SPY_THREAD = re.compile(r"^thread \((\d+)\)")


def role_of(name: str, tid: int, pid: int) -> str:
    """A thread's role from its OS name (see the module docstring)."""
    if tid == pid:
        return "loop"
    if name.startswith("preprocess"):
        return "preprocess"
    if name.startswith(("infer-", "infer_", "request")):
        return "inference"
    if name.startswith("ort-"):
        return "onnxruntime"
    if name.startswith(_GRPC_NAMES):
        return "grpc"
    return "other"


@dataclass(frozen=True)
class Snapshot:
    """One reading of a process and its child processes (a `--workers` supervisor's workers):
    their total CPU seconds, and each live thread's (name, seconds, its process's pid)."""

    total_s: float
    threads: dict[int, tuple[str, float, int]]


def _stat_cpu_s(path: str) -> float:
    with open(path) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _children(pid: int) -> list[int]:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found = []
    for tid in tids:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            continue
    return found


def snapshot(pid: int, children: bool = False) -> Snapshot | None:
    """Read the process (and with `children` its child processes: a supervisor's workers) and
    all their threads now; None where /proc does not have the process."""
    total, threads = 0.0, {}
    for process in [pid, *(_children(pid) if children else [])]:
        try:
            total += _stat_cpu_s(f"/proc/{process}/stat")
            tids = os.listdir(f"/proc/{process}/task")
        except OSError:
            if process == pid:
                return None
            continue  # a child that ended meanwhile
        for entry in tids:
            base = f"/proc/{process}/task/{entry}"
            try:
                with open(f"{base}/comm") as f:
                    name = f.read().strip()
                threads[int(entry)] = (name, _stat_cpu_s(f"{base}/stat"), process)
            except OSError:  # ended between the listing and the read
                continue
    return Snapshot(total, threads)


def cpu_by_role(start: Snapshot, end: Snapshot, pid: int) -> dict[str, float]:
    """CPU seconds per role between two readings; threads born in between count from zero, and
    what the live threads do not account for (threads that ended) goes to `other`. Each
    process's main thread is its event loop (a supervisor's too)."""
    roles = dict.fromkeys(ROLES, 0.0)
    for tid, (name, cpu, process) in end.threads.items():
        before = start.threads.get(tid)
        roles[role_of(name, tid, process)] += cpu - (before[1] if before else 0.0)
    roles["other"] += max(0.0, (end.total_s - start.total_s) - sum(roles.values()))
    return roles


def per_image_ms(seconds: dict[str, float], images: int) -> dict[str, float]:
    return {k: round(1000 * v / images, 3) if images else float("nan") for k, v in seconds.items()}


# ------------------------------------------------------------------------------------------ GIL


class SamplingError(RuntimeError):
    """py-spy could not sample the process; the message says why."""


@dataclass(frozen=True)
class Gil:
    """GIL held over a sampled window: the fraction of time, and seconds per role of the holder."""

    held: float  # fraction of the sampled time some thread held the GIL
    sampled_s: float
    samples: int
    by_role_s: dict[str, float]  # seconds held per role, scaled to the whole window

    @property
    def held_s(self) -> float:
        """Seconds held over the whole window: the roles' sum, so that they add up to it."""
        return sum(self.by_role_s.values())


def py_spy() -> str | None:
    """The py-spy executable: beside this Python first (a venv's), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


class GilSampler:
    """py-spy recording which thread holds the GIL, from `start()` to `stop()`."""

    def __init__(self, pid: int, rate: int = GIL_RATE):
        exe = py_spy()
        if exe is None:
            raise FileNotFoundError("py-spy is not installed (pip install py-spy, or 'mobiserve[dev]')")
        self.pid, self.rate, self._exe = pid, rate, exe
        self._proc: subprocess.Popen[str] | None = None
        self._out = ""
        self._sampling = threading.Event()
        self._started = 0.0
        self._output: list[str] = []

    def start(self) -> None:
        fd, self._out = tempfile.mkstemp(prefix="mobiserve-gil-", suffix=".txt")
        os.close(fd)
        cmd = [self._exe, "record", "--pid", str(self.pid), "--gil", "--threads", "--nonblocking"]
        cmd += ["--rate", str(self.rate), "--format", "raw", "--output", self._out]
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # py-spy prints its messages to stdout when that is not a terminal
            text=True,
        )
        threading.Thread(target=self._read, name="gil-sampler-log", daemon=True).start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._output.append(line)
            if "Sampling process" in line and not self._sampling.is_set():
                self._started = time.monotonic()  # py-spy has attached: sampling starts now
                self._sampling.set()

    def stop(self, window_s: float) -> Gil:
        """Stop sampling; the fraction held is scaled to `window_s` seconds per role."""
        proc = self._proc
        assert proc is not None
        stopped = time.monotonic()
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:
            if not self._sampling.is_set():
                tail = "".join(self._output[-5:]).strip()
                raise SamplingError(
                    f"py-spy did not sample process {self.pid} (it needs ptrace rights over it): {tail or 'no output'}"
                )
            sampled_s = stopped - self._started
            counts: Counter[int] = Counter()
            for line in Path(self._out).read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if m := _PY_SPY_THREAD.match(stack):
                    counts[int(m.group(1))] += int(count)
        finally:
            Path(self._out).unlink(missing_ok=True)
        names = _thread_names(self.pid)
        ticks = max(1.0, sampled_s * self.rate)
        by_role = dict.fromkeys(ROLES, 0.0)
        for tid, n in counts.items():
            by_role[role_of(names.get(tid, ""), tid, self.pid)] += window_s * n / ticks
        samples = sum(counts.values())
        return Gil(min(1.0, samples / ticks), round(sampled_s, 3), samples, by_role)


def _thread_names(pid: int) -> dict[int, str]:
    shot = snapshot(pid)
    return {} if shot is None else {tid: name for tid, (name, _, _) in shot.threads.items()}


# ------------------------------------------------------------------------------- window probe


@dataclass(frozen=True)
class Cost:
    """A measured window's cost of a process: CPU seconds by role, and the GIL when sampled."""

    cpu_s: float
    by_role_s: dict[str, float]
    gil: Gil | None = None


class Probe:
    """Reads a process at a window's start and end (`start()`, `stop()`), with py-spy's GIL
    sampling in between when asked. Used for the servers the harness starts and for itself."""

    def __init__(self, pid: int, gil: bool = False, children: bool = False):
        self.pid = pid
        self.children = children  # a server with --workers: the supervisor and its workers
        self._gil = GilSampler(pid) if gil else None
        self._start: Snapshot | None = None
        self._t0 = 0.0

    def start(self) -> None:
        if self._gil is not None:
            self._gil.start()
        self._start, self._t0 = snapshot(self.pid, self.children), time.monotonic()

    def stop(self) -> Cost | None:
        end, window = snapshot(self.pid, self.children), time.monotonic() - self._t0
        gil = self._gil.stop(window) if self._gil is not None else None
        if self._start is None or end is None:
            return None
        roles = cpu_by_role(self._start, end, self.pid)
        # the roles' sum is the total: the threads are read a moment after the process's own
        # figure, so their sum may run ahead of it (ended threads' time is in `other` already)
        return Cost(sum(roles.values()), roles, gil)
