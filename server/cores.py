"""How many cores this process may use: what every CPU-derived default is sized from (sessions,
preprocessing threads, workers, the bench's references)."""

from __future__ import annotations

import os
from pathlib import Path

CORES_ENV = "MOBISERVE_CORES"  # set by the worker supervisor: each worker's share of the cores


def available_cores() -> int:
    """Cores this process may use: $MOBISERVE_CORES if set, else the CPU affinity, capped by the
    container's CPU quota (cgroup v2 `cpu.max` or v1 CFS quota), which Kubernetes sets from the
    pod's CPU limit without changing the affinity: without the cap every default would size
    itself for the whole node."""
    if os.environ.get(CORES_ENV):
        return max(1, int(os.environ[CORES_ENV]))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cpu_quota()
    return max(1, min(cores, int(quota))) if quota else cores


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
