"""Serve one candidate configuration and measure it with the harness's load generator.

Each candidate is served from the TOML file `tune` would write for it (`serve --config`, the
path a user takes), on a free 127.0.0.1 port, and measured in three steps: lone requests (one in
flight), a saturating closed loop, and an open loop at the target rate (Poisson arrivals,
latency from each request's scheduled time, so a server that falls behind shows it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mobiserve.bench import servers
from mobiserve.bench.loadgen import Load, StepResult, Workload, run_step
from mobiserve.bench.tune.space import Candidate, Figures


@dataclass(frozen=True)
class Windows:
    """Seconds measured per step, after `warmup_s` of unmeasured load each."""

    lone_s: float = 2.0
    saturated_s: float = 3.0
    rate_s: float = 3.0
    warmup_s: float = 1.0

    def scaled(self, factor: float) -> Windows:
        return Windows(self.lone_s * factor, self.saturated_s * factor, self.rate_s * factor, self.warmup_s)

    @property
    def seconds(self) -> float:
        return self.lone_s + self.saturated_s + self.rate_s + 3 * self.warmup_s


@dataclass(frozen=True)
class Setup:
    """What every measurement shares."""

    images: tuple[str, ...]
    cores: int
    rate: float = 0.0  # open-loop requests (= images) per second; 0: half the saturated throughput
    timeout_s: float = 30.0

    @property
    def saturating(self) -> int:
        """Requests in flight that keep every core busy (batches of up to 32 per core and more)."""
        return max(32, 16 * self.cores)

    @property
    def client_processes(self) -> int:
        return max(2, self.cores // 4)


def connections(candidate: Candidate, processes: int) -> int:
    """Connections per load process: about four per worker in all, so that the kernel's spread of
    connections over the workers (by a hash: it spreads connections, not calls) is even enough."""
    return max(1, math.ceil(4 * candidate.workers / processes))


def measure(config: Path, candidate: Candidate, setup: Setup, windows: Windows, log: Path | None = None) -> Figures:
    """Serve `config` (the candidate's TOML) and measure it; a BenchError if it does not serve."""
    with _serving(config, log) as target:
        lone = _step(target, setup, windows.lone_s, windows.warmup_s, concurrency=1, processes=1, connections=1)
        processes = setup.client_processes
        spread = connections(candidate, processes)
        saturated = _step(
            target,
            setup,
            windows.saturated_s,
            windows.warmup_s,
            setup.saturating,
            processes=processes,
            connections=spread,
        )
        rate = setup.rate or max(1.0, saturated.img_s / 2)
        opened = _step(
            target, setup, windows.rate_s, windows.warmup_s, rate=rate, processes=processes, connections=spread
        )
    return Figures(
        lone_p50_ms=lone.p50_ms,
        saturated_img_s=saturated.img_s,
        saturated_p99_ms=saturated.p99_ms,
        rate_p50_ms=opened.p50_ms,
        rate_p99_ms=opened.p99_ms,
        errors=sum(sum(s.errors.values()) for s in (lone, saturated, opened)),
        rate=rate,
    )


class _serving:
    """`mobiserve serve --config FILE` on a free port for the block; its target."""

    def __init__(self, config: Path, log: Path | None):
        self._command = servers.serve_command("--config", str(config))
        self._log = log
        self._server: servers.ServerProcess | None = None

    def __enter__(self) -> str:
        self._server = servers.start(self._command, what="mobiserve serve", log=self._log)
        return self._server.target

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()


def _step(
    target: str,
    setup: Setup,
    seconds: float,
    warmup_s: float,
    concurrency: int = 0,
    rate: float = 0.0,
    processes: int = 1,
    connections: int = 1,
) -> StepResult:
    workload = Workload(target=target, images=setup.images, timeout_s=setup.timeout_s, connections=connections)
    load = Load(concurrency=concurrency, rate=rate, duration_s=seconds, warmup_s=warmup_s, processes=processes)
    return run_step(workload, load, "mobiserve", setup.cores, progress=False)
