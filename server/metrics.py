"""Prometheus metrics (prometheus-client), one registry per server so tests can run several.

Names follow Prometheus conventions: a `mobiserve_` prefix, `_total` counters, base units
(`_seconds`) and a unit-like suffix (`_images`) for counts of images. docs/operations.md lists them.
The HTTP endpoint that serves the registry is `metrics_http.MetricsServer`.

Under `mobiserve serve --workers N` each worker process writes its samples to files that the
supervisor sums (prometheus-client's multiprocess mode, on when $PROMETHEUS_MULTIPROC_DIR is
set): the gauges say how to combine the workers' values, and a gauge's value is set, never
computed at scrape time (a callback would run in the supervisor, which has no queue).
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class BatchTotals:
    size: int
    count: int
    seconds: float


@dataclass(frozen=True)
class ModelStatistics:
    """A model's cumulative figures since start, as the Open Inference Protocol's statistics
    report them. What the Prometheus series hold is read from them, so the two always agree."""

    inferences: int  # images classified (mobiserve_images_total)
    executions: int  # batches run (mobiserve_inference_duration_seconds_count)
    success: int  # requests answered OK (mobiserve_requests_total{code="OK"}) and their time
    success_s: float
    fail: int  # requests answered with any other status, and their time
    fail_s: float
    queue: int  # classified requests (mobiserve_queue_duration_seconds) and their longest waits
    queue_s: float
    preprocess_s: float  # their preprocessing (mobiserve_preprocess_duration_seconds_sum)
    compute_s: float  # their batches' run time, each request counting the batches it rode in
    batches: tuple[BatchTotals, ...]  # by batch size; seconds add up to the inference duration sum
    last_inference_ms: int  # the last batch's end, milliseconds since the epoch (0: none yet)


@dataclass
class _Totals:
    """The figures no Prometheus series keeps: outcomes' durations, per-request compute time,
    exact batch sizes. Updated by the same calls, with the same values, as the series."""

    success: int = 0
    success_s: float = 0.0
    fail: int = 0
    fail_s: float = 0.0
    compute_s: float = 0.0
    batches: dict[int, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0, 0.0]))
    last_inference_ms: int = 0


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mobiserve_requests",
            "Requests answered (one per unary call or stream message), by gRPC status code.",
            ["model", "method", "code"],
            registry=r,
        )
        self.images = Counter("mobiserve_images", "Images classified.", ["model"], registry=r)
        self.request_seconds = Histogram(
            "mobiserve_request_duration_seconds",
            "Time from receiving a request to its answer, whatever the status.",
            ["model", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "mobiserve_queue_duration_seconds",
            "Time a request's images waited for their batch (the longest wait).",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess_seconds = Histogram(
            "mobiserve_preprocess_duration_seconds",
            "Decode + resize + crop time of a request's images.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "mobiserve_inference_duration_seconds",
            "onnxruntime time of one batch.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "mobiserve_batch_size_images",
            "Images per batch run.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "mobiserve_queue_depth_images",
            "Images admitted and not yet in a batch (the figure --max-queue-size bounds).",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",  # the server's queue: all its workers' together
        )
        self.lane_depth = Gauge(
            "mobiserve_lane_queue_depth_images",
            "Images admitted to a lane and not yet in a batch (what the lane's queue limit bounds).",
            ["model", "lane"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.lane_wait_seconds = Histogram(
            "mobiserve_lane_queue_duration_seconds",
            "Time each image waited in its lane's queue for a batch.",
            ["model", "lane"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.lane_images = Counter(
            "mobiserve_lane_images", "Images run, by the lane that served them.", ["model", "lane"], registry=r
        )
        self.lane_guarded = Counter(
            "mobiserve_lane_guarded_images",
            "Images run ahead of more urgent work because their lane was owed its share (the starvation guard).",
            ["model", "lane"],
            registry=r,
        )
        self.streams_paused = Gauge(
            "mobiserve_streams_paused",
            "Open streams not being read now, by what they wait for: room in their window of unsent "
            "answers, or in their bulk lane.",
            ["reason"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.model_ready = Gauge(
            "mobiserve_model_ready",
            "1 while the model is loaded, warm and taking requests.",
            ["model"],
            registry=r,
            multiprocess_mode="liveall",  # one series per worker process (a `pid` label)
        )
        self._totals: dict[str, _Totals] = defaultdict(_Totals)  # model labels are a bounded set
        self._lock = threading.Lock()  # the statistics are read as one consistent snapshot

    def observe_request(self, model: str, method: str, code: str, seconds: float) -> None:
        """One answered inference request (or stream message), whatever its status."""
        with self._lock:
            self.requests.labels(model, method, code).inc()
            self.request_seconds.labels(model, method).observe(seconds)
            totals = self._totals[model]
            if code == "OK":
                totals.success += 1
                totals.success_s += seconds
            else:
                totals.fail += 1
                totals.fail_s += seconds

    @property
    def multiprocess(self) -> bool:
        """A worker of `--workers N`: the supervisor serves the metrics."""
        return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

    @contextmanager
    def paused(self, reason: str) -> Iterator[None]:
        """A stream not read while the block runs (`reason`: "window" or "lane")."""
        gauge = self.streams_paused.labels(reason)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    def observe_result(self, model: str, images: int, queue_s: float, preprocess_s: float, compute_s: float) -> None:
        """A classified request: its images and where its time went (compute: the batches it rode in)."""
        with self._lock:
            self.images.labels(model).inc(images)
            self.queue_seconds.labels(model).observe(queue_s)
            self.preprocess_seconds.labels(model).observe(preprocess_s)
            self._totals[model].compute_s += compute_s

    def observe_batch(
        self, model: str, size: int, seconds: float, lane: str = "", waits: Sequence[float] = (), guarded: bool = False
    ) -> None:
        """One batch run (or a lone input), and how long each of its images waited in its lane."""
        with self._lock:
            if lane:
                self.lane_images.labels(model, lane).inc(size)
                if guarded:
                    self.lane_guarded.labels(model, lane).inc(size)
                histogram = self.lane_wait_seconds.labels(model, lane)
                for wait in waits:
                    histogram.observe(wait)
            self.batch_size.labels(model).observe(size)
            self.inference_seconds.labels(model).observe(seconds)
            totals = self._totals[model]
            batch = totals.batches[size]
            batch[0] += 1
            batch[1] += seconds
            totals.last_inference_ms = int(time.time() * 1000)

    def statistics(self, model: str) -> ModelStatistics:
        def sample(name: str) -> float:
            return self.registry.get_sample_value(name, {"model": model}) or 0.0

        with self._lock:
            t = self._totals[model]
            return ModelStatistics(
                inferences=int(sample("mobiserve_images_total")),
                executions=int(sample("mobiserve_inference_duration_seconds_count")),
                success=t.success,
                success_s=t.success_s,
                fail=t.fail,
                fail_s=t.fail_s,
                queue=int(sample("mobiserve_queue_duration_seconds_count")),
                queue_s=sample("mobiserve_queue_duration_seconds_sum"),
                preprocess_s=sample("mobiserve_preprocess_duration_seconds_sum"),
                compute_s=t.compute_s,
                batches=tuple(BatchTotals(size, int(n), s) for size, (n, s) in sorted(t.batches.items())),
                last_inference_ms=t.last_inference_ms,
            )
