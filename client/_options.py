"""Channel settings, set once per client: retries, load balancing, keepalive, message sizes.

Retries and balancing are gRPC's own, configured through the service config, so they behave
exactly as documented by gRPC (backoff with jitter, attempts across subchannels) and no loop
in this library can get them subtly wrong.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mobiserve.v1 import classifier_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Classifier"].full_name  # "mobiserve.v1.Classifier"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20  # the server's default limit
MAX_ATTEMPTS = 5  # what gRPC allows a retry policy (it clamps more, with a warning on stderr)

ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC retries with exponential backoff (each delay jittered by gRPC).

    UNAVAILABLE (no server took the call) is always safe to retry. RESOURCE_EXHAUSTED (the
    model's queue is full; nothing was queued) is retried for the unary calls, which are
    idempotent. ClassifyStream is retried only until the server has answered anything: after
    that gRPC cannot replay it, and a full queue fails single requests inside the stream.
    """

    max_attempts: int = MAX_ATTEMPTS  # including the first
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    backoff_multiplier: float = 2.0
    retry_overloaded: bool = True  # also retry RESOURCE_EXHAUSTED on Classify and ListModels

    def __post_init__(self) -> None:
        """Refused here, in words: gRPC itself clamps more than 5 attempts with a log line on
        stderr, and drops a policy of 1 attempt or of no backoff."""
        if not 2 <= self.max_attempts <= MAX_ATTEMPTS:
            raise ValueError(
                f"RetryPolicy(max_attempts={self.max_attempts}): gRPC makes 2 to {MAX_ATTEMPTS} attempts per call "
                "(the first included); for no retries pass retry=None"
            )
        for name in ("initial_backoff_s", "max_backoff_s", "backoff_multiplier"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RetryPolicy({name}={getattr(self, name)}): must be positive")

    def as_json(self, codes: Sequence[str]) -> dict[str, Any]:
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff_s:.3f}s",
            "maxBackoff": f"{self.max_backoff_s:.3f}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(codes),
        }


@dataclass(frozen=True)
class KeepAlive:
    """HTTP/2 pings that detect a dead connection under a long stream.

    The server must permit the rate: gRPC servers by default refuse pings more often than every
    5 minutes without data in flight, and close connections that ping too eagerly.
    """

    time_ms: int = 300_000
    timeout_ms: int = 20_000
    permit_without_calls: bool = False


def service_config(retry: RetryPolicy | None, load_balancing: str, watch_health: bool = True) -> dict[str, Any]:
    """gRPC's service config. `watch_health`: gRPC's client-side health checking: each connection
    watches the server's health service, and calls go only to servers that say SERVING, so a
    draining or loading server is left at once (servers without a health service count as healthy)."""
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    if watch_health:
        config["healthCheckConfig"] = {"serviceName": SERVICE}
    if retry is not None:
        unary = ["UNAVAILABLE", "RESOURCE_EXHAUSTED"] if retry.retry_overloaded else ["UNAVAILABLE"]
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE, "method": "Classify"}, {"service": SERVICE, "method": "ListModels"}],
                "retryPolicy": retry.as_json(unary),
            },
            {"name": [{"service": SERVICE, "method": "ClassifyStream"}], "retryPolicy": retry.as_json(["UNAVAILABLE"])},
        ]
    return config


def channel_options(
    retry: RetryPolicy | None,
    keepalive: KeepAlive | None,
    max_message_bytes: int,
    load_balancing: str,
    extra: ChannelOptions,
    watch_health: bool = True,
) -> list[tuple[str, Any]]:
    """The options for `grpc.insecure_channel` / `secure_channel`; `extra` wins over ours."""
    options: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.enable_retries": int(retry is not None),
        "grpc.service_config": json.dumps(service_config(retry, load_balancing, watch_health)),
        # a DNS TXT record must not replace the policy this client was configured with
        "grpc.service_config_disable_resolution": 1,
    }
    if keepalive is not None:
        options.update(
            {
                "grpc.keepalive_time_ms": keepalive.time_ms,
                "grpc.keepalive_timeout_ms": keepalive.timeout_ms,
                "grpc.keepalive_permit_without_calls": int(keepalive.permit_without_calls),
            }
        )
    options.update(dict(extra))
    return list(options.items())
