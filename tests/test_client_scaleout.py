"""gRPC's own retries and round_robin, with real `mobiserve serve` processes on 127.0.0.1.

What reached which server is read from each server's own /metrics, not from the client.
"""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mobiserve.client import Client, RetryPolicy, Unavailable

import helpers
from helpers import SYNSETS

pytestmark = pytest.mark.slow  # real processes or whole-sample sweeps

# Reconnect quickly once a server appears; gRPC's default waits 1 s, then 1.6 s, 2.6 s, ...
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]


def classified(metrics_port: int) -> float:
    """Classify requests this server answered OK, from its Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as page:
        text = page.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "mobiserve_requests"
        for sample in family.samples
        if sample.name == "mobiserve_requests_total"
        and (sample.labels["method"], sample.labels["code"]) == ("Classify", "OK")
    )


def test_a_call_made_before_the_server_starts_succeeds_through_retries(int8_model: Path, jpeg: bytes) -> None:
    port = helpers.free_port()
    target = f"127.0.0.1:{port}"
    with Client(target, retry=None, options=FAST_RECONNECT) as client, pytest.raises(Unavailable):
        client.classify(jpeg)  # nothing listens yet: without retries the call fails at once
    # attempts about 1, 3, 7 and 15 s after the first (gRPC jitters each delay by 20%)
    patient = RetryPolicy(max_attempts=5, initial_backoff_s=1.0, max_backoff_s=8.0, backoff_multiplier=2.0)
    with Client(target, retry=patient, timeout=60, options=FAST_RECONNECT) as client, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.classify, jpeg)
        server = helpers.serve("--port", str(port), "--model", str(int8_model), "--synsets", str(SYNSETS))
        try:
            result = pending.result(timeout=90)
        finally:
            server.signal()
            server.wait()
    assert len(result.classes) == 5 and result.model == int8_model.stem


def test_round_robin_spreads_calls_over_two_server_processes(int8_model: Path) -> None:
    metrics_ports = [helpers.free_port(), helpers.free_port()]
    servers: list[helpers.ServerProcess] = []
    try:
        for metrics_port in metrics_ports:
            servers.append(
                helpers.serve(
                    "--model", str(int8_model), "--synsets", str(SYNSETS), "--metrics-port", str(metrics_port)
                )
            )
        target = "ipv4:" + ",".join(s.target for s in servers)
        calls = 40
        pixels = np.zeros((64, 64, 3), np.uint8)
        with Client(target) as client:
            for _ in range(calls):
                client.classify(pixels)
        answered = [classified(port) for port in metrics_ports]
    finally:
        for server in servers:
            server.signal()
        for server in servers:
            server.wait()
    assert sum(answered) == calls
    assert min(answered) > 0, answered
