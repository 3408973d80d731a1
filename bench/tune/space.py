"""What `mobiserve tune` tries, in which order, and how it picks: pure functions, no I/O.

The grid is workers x intra-op threads x lone-request threads x max batch size x queue delay.
All of it would be hundreds of configurations of ~20 s each, so the search goes coarse to fine,
one dimension at a time, from the dimension that matters most (how the cores are split among
worker processes and threads) to the one that matters least (the queue delay), each stage
starting from the best configuration so far; then the best few are measured again for longer
(successive halving: figures from short runs rank roughly, longer runs decide) and each
configuration's figures are the mean of its runs. The dimensions are nearly independent here:
the split decides the CPU per image, the batch size how much of it batching saves, the delay
only what an open loop sees.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

BATCH_SIZES = (8, 16, 32, 64)
QUEUE_DELAYS_MS = (0.0, 1.0, 2.0, 5.0)
LONE_START = 4  # the server's default: a batch of one gets no faster past ~4 threads on MobileNetV2
LONE_MAX = 8  # ... and 8 bounds the search
START_BATCH = 32
FINALISTS = 3


@dataclass(frozen=True, order=True)
class Candidate:
    """One serving configuration: `workers` processes, each with one session of
    `intra_op_threads` threads under load and `lone_threads` for lone requests."""

    workers: int
    intra_op_threads: int
    lone_threads: int
    max_batch_size: int = START_BATCH
    max_queue_delay_ms: float = 0.0

    @property
    def label(self) -> str:
        return (
            f"{self.workers}w x {self.intra_op_threads}t, lone {self.lone_threads}t, "
            f"batch {self.max_batch_size}, delay {self.max_queue_delay_ms:g} ms"
        )


@dataclass(frozen=True)
class Figures:
    """One measurement of a candidate (latencies in ms, throughput in images/s)."""

    lone_p50_ms: float  # one request at a time (c=1)
    saturated_img_s: float  # closed loop, enough requests in flight to keep every core busy
    saturated_p99_ms: float
    rate_p50_ms: float  # open loop at the target rate
    rate_p99_ms: float
    errors: int
    rate: float = 0.0  # the open loop's requests (images) per second


@dataclass
class Trial:
    """A candidate and every measurement of it; its figures are their means."""

    candidate: Candidate
    stage: str
    runs: list[Figures] = field(default_factory=list)

    def mean(self, name: str) -> float:
        values = [getattr(run, name) for run in self.runs]
        return statistics.fmean(values) if values else math.nan


@dataclass(frozen=True)
class Budget:
    """The latency budget a pick must meet (None: no limit)."""

    p50_ms: float | None = None  # lone request and at the target rate
    p99_ms: float | None = None  # at the target rate

    def met(self, trial: Trial) -> bool:
        if not trial.runs or any(run.errors for run in trial.runs):
            return False
        if self.p50_ms is not None and max(trial.mean("lone_p50_ms"), trial.mean("rate_p50_ms")) > self.p50_ms:
            return False
        return self.p99_ms is None or trial.mean("rate_p99_ms") <= self.p99_ms


def layouts(cores: int) -> list[Candidate]:
    """How the cores may be split: 1, 2, 4, ... workers (and one per core), each worker's share
    on one session's intra-op threads, lone requests on all cores up to LONE_START. The server's
    default (one worker per core) first: the open loop's rate is set from it."""
    counts = [cores, *sorted({1, *(2**k for k in range(1, cores.bit_length()) if 2**k < cores)} - {cores})]
    lone = min(cores, LONE_START)
    return [Candidate(w, max(1, cores // w), max(lone, cores // w)) for w in counts]


def lone_options(best: Candidate, cores: int) -> list[Candidate]:
    """Other lone-request widths for the best split: its own share, and 2, 4, ... up to all cores."""
    widths = {best.intra_op_threads, *(2**k for k in range(1, 4) if 2**k <= min(cores, LONE_MAX))}
    return [replace(best, lone_threads=w) for w in sorted(widths) if w >= best.intra_op_threads]


def batch_options(best: Candidate) -> list[Candidate]:
    return [replace(best, max_batch_size=b) for b in BATCH_SIZES]


def delay_options(best: Candidate) -> list[Candidate]:
    return [replace(best, max_queue_delay_ms=d) for d in QUEUE_DELAYS_MS]


STAGES = ("split", "lone", "batch", "delay")


def stage_candidates(stage: str, best: Candidate | None, cores: int) -> list[Candidate]:
    if stage == "split" or best is None:
        return layouts(cores)
    if stage == "lone":
        return lone_options(best, cores)
    return batch_options(best) if stage == "batch" else delay_options(best)


def ranked(trials: Iterable[Trial], budget: Budget) -> list[Trial]:
    """Best first: those meeting the budget by throughput, then the rest by how far over it they are."""

    def key(trial: Trial) -> tuple[int, float]:
        if budget.met(trial):
            return (0, -trial.mean("saturated_img_s"))
        return (1, _excess(trial, budget))

    return sorted((t for t in trials if t.runs), key=key)


def _excess(trial: Trial, budget: Budget) -> float:
    """How far over its budget a trial is, relatively (errors count as infinitely far)."""
    if any(run.errors for run in trial.runs):
        return math.inf
    over = [0.0]
    if budget.p50_ms is not None:
        over.append(max(trial.mean("lone_p50_ms"), trial.mean("rate_p50_ms")) / budget.p50_ms - 1)
    if budget.p99_ms is not None:
        over.append(trial.mean("rate_p99_ms") / budget.p99_ms - 1)
    return max(over) - trial.mean("saturated_img_s") * 1e-9  # a tie goes to throughput


def finalists(trials: Sequence[Trial], budget: Budget, count: int = FINALISTS) -> list[Trial]:
    """The ones to measure again: the best `count` so far."""
    return ranked(trials, budget)[:count]
