"""How many cores this process may use, and how the workers of one server share them: what every
CPU-derived default is sized from (sessions, preprocessing threads, workers, the bench's references),
and the ledger through which a worker takes the all-core path only while the other cores are free."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.sharedctypes import RawArray
from pathlib import Path
from typing import Any

import numpy as np

CORES_ENV = "MOBISERVE_CORES"  # set by the worker supervisor: each worker's share of the cores
SERVER_CORES_ENV = "MOBISERVE_SERVER_CORES"  # ... and the cores of the whole server, all workers together
BUSY_HOLD_S = 0.05  # a worker that ran inference this recently counts as busy: under load the gaps
# between its batches are a few ms, so a loaded worker stays busy; an idle one is free within 50 ms


def available_cores() -> int:
    """Cores this process may use: $MOBISERVE_CORES if set, else the CPU affinity, capped by the
    container's CPU quota (cgroup v2 `cpu.max` or v1 CFS quota), which Kubernetes sets from the
    pod's CPU limit without changing the affinity: without the cap every default would size
    itself for the whole node."""
    if os.environ.get(CORES_ENV):
        return max(1, int(os.environ[CORES_ENV]))
    return machine_cores()


def machine_cores() -> int:
    """Cores the server as a whole may use: the affinity capped by the cgroup's quota."""
    if os.environ.get(SERVER_CORES_ENV):
        return max(1, int(os.environ[SERVER_CORES_ENV]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cpu_quota()
    return max(1, min(cores, int(quota))) if quota else cores


def preprocess_threads() -> int:
    """Default preprocessing threads: twice this process's share of the cores (at most all of
    them), so that a worker's decoding overlaps its inference and spills onto the cores of
    workers that are idle; threads beyond that only switch contexts."""
    return min(machine_cores(), 2 * available_cores())


def _cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup's CPU limit in cores, None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 else None
    except (OSError, ValueError):
        return None


def shared_slots(workers: int) -> Any:
    """The memory a supervisor shares with its workers for their CoreLedger: per worker, the
    threads its inference runs on and until when it counts as busy (made before the workers
    start; a spawned worker gets it as a Process argument)."""
    return RawArray("d", 2 * workers)


class CoreLedger:
    """Which workers of this server run inference now, on how many threads: so that a worker
    runs a lone request on all its cores' worth of threads only when those cores are free.

    Each worker writes only its own slot (threads in use, busy-until time on the machine-wide
    monotonic clock) and reads the others' without a lock: two workers deciding in the same
    microsecond may both widen once, which costs that one run some speed and nothing else. A
    single-process server has a ledger of its own with one slot."""

    def __init__(self, cores: int, slots: Any = None, index: int = 0):
        self.cores = cores
        self.index = index
        self.slots = slots if slots is not None else shared_slots(1)
        self._slots = np.frombuffer(self.slots, dtype=np.float64).reshape(-1, 2)
        self._others = np.arange(len(self._slots)) != index
        self._lock = threading.Lock()
        self._threads = 0  # this process's runs in progress, threads summed
        self.clear(index)

    def clear(self, index: int) -> None:
        """Worker `index` is idle (at start, and by the supervisor when it died)."""
        self._slots[index] = (0.0, 0.0)

    def others(self) -> int:
        """Threads the other workers run inference on now (or did a moment ago)."""
        busy = self._others & (self._slots[:, 1] > time.monotonic())
        return int(self._slots[busy, 0].sum())

    def free_for(self, threads: int) -> bool:
        """May this worker run `threads` more threads without taking another run's cores?"""
        return self.others() + self._threads + threads <= self.cores

    @contextmanager
    def running(self, threads: int) -> Iterator[None]:
        """Mark this worker busy on `threads` more threads for the block."""
        with self._lock:
            self._threads += threads
            self._slots[self.index] = (self._threads, np.inf)
        try:
            yield
        finally:
            with self._lock:
                self._threads -= threads
                until = np.inf if self._threads else time.monotonic() + BUSY_HOLD_S
                self._slots[self.index] = (self._threads or threads, until)
