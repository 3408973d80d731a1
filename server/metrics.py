"""Prometheus metrics (prometheus-client), one registry per server so tests can run several.

Names follow Prometheus conventions: a `mobiserve_` prefix, `_total` counters, base units
(`_seconds`) and a unit-like suffix (`_images`) for counts of images. docs/operations.md lists them.
The HTTP endpoint that serves the registry is `metrics_http.MetricsServer`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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
        )
        self.model_ready = Gauge(
            "mobiserve_model_ready",
            "1 while the model is loaded, warm and taking requests.",
            ["model"],
            registry=r,
        )

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.inference_seconds.labels(model).observe(seconds)
