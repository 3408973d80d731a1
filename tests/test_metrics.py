"""The /metrics endpoint after a known load: every count adds up to what was sent. And the logs:
no line per request by default, failures throttled."""

from __future__ import annotations

import asyncio
import logging
import os
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mobiserve.server.metrics_http import MetricsServer
from mobiserve.server.transport.errorlog import ErrorLog
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import model_config, request_of, start_server

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every sample of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


async def test_metrics_add_up_to_a_known_load(
    int8_model: Path, sample_images: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    good = [p.read_bytes() for p in sample_images[:12]]
    junk = os.urandom(3000)
    app = await start_server(model_config(int8_model, name="int8", max_batch_size=8))
    endpoint = MetricsServer(app.metrics.registry)
    port = await endpoint.start("127.0.0.1", 0)
    sent: Counter[tuple[str, str, str]] = Counter()  # (model label, method, code)
    try:
        with caplog.at_level(logging.INFO, logger="mobiserve"):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                stub = pb_grpc.ClassifierStub(channel)

                async def unary(request: pb.ClassifyRequest, label: str) -> None:
                    try:
                        await stub.Classify(request, timeout=60)
                        code = "OK"
                    except grpc.aio.AioRpcError as e:
                        code = e.code().name
                    sent[(label, "Classify", code)] += 1

                await asyncio.gather(
                    *(unary(request_of(b), "int8") for b in good),  # default model
                    *(unary(request_of(b, model="int8"), "int8") for b in good[:3]),
                    unary(request_of(*good[:4]), "int8"),  # 4 images, one request
                    *(unary(request_of(junk), "int8") for _ in range(5)),
                    *(unary(request_of(good[0], model=f"nope-{i}"), "(unknown)") for i in range(3)),
                )
                stream = stub.ClassifyStream(timeout=60)
                for i, data in enumerate([*good[:6], junk, junk]):
                    await stream.write(request_of(data, request_id=str(i)))
                await stream.done_writing()
                async for response in stream:
                    code = grpc.StatusCode.INVALID_ARGUMENT.name if response.HasField("error") else "OK"
                    sent[("int8", "ClassifyStream", code)] += 1
        assert sent == {
            ("int8", "Classify", "OK"): 16,
            ("int8", "Classify", "INVALID_ARGUMENT"): 5,
            ("(unknown)", "Classify", "NOT_FOUND"): 3,
            ("int8", "ClassifyStream", "OK"): 6,
            ("int8", "ClassifyStream", "INVALID_ARGUMENT"): 2,
        }
        samples = await asyncio.to_thread(scrape, port)
    finally:
        await endpoint.close()
        await app.stop(grace_s=5)

    counted = {
        (dict(ls)["model"], dict(ls)["method"], dict(ls)["code"]): v
        for (n, ls), v in samples.items()
        if n == "mobiserve_requests_total"
    }
    assert counted == sent  # one count per request or stream message, refusals included
    ok = 16 + 6
    images = 15 + 4 + 6  # the OK requests' images
    assert value(samples, "mobiserve_images_total", model="int8") == images
    assert total(samples, "mobiserve_request_duration_seconds_count") == sum(sent.values())
    for stage in ("queue", "preprocess"):
        assert value(samples, f"mobiserve_{stage}_duration_seconds_count", model="int8") == ok
    batches = value(samples, "mobiserve_batch_size_images_count", model="int8")
    assert value(samples, "mobiserve_batch_size_images_sum", model="int8") == images  # every image ran once
    assert value(samples, "mobiserve_inference_duration_seconds_count", model="int8") == batches
    assert 1 <= batches <= images
    assert value(samples, "mobiserve_queue_depth_images", model="int8") == 0
    lanes = {"interactive": 15 + 4, "bulk": 6}  # unary calls are interactive, stream messages bulk
    for lane, count in lanes.items():
        assert value(samples, "mobiserve_lane_images_total", model="int8", lane=lane) == count
        assert value(samples, "mobiserve_lane_queue_duration_seconds_count", model="int8", lane=lane) == count
        assert value(samples, "mobiserve_lane_queue_depth_images", model="int8", lane=lane) == 0
    assert value(samples, "mobiserve_model_ready", model="int8") == 1
    assert app.metrics.registry.get_sample_value("mobiserve_model_ready", {"model": "int8"}) == 0  # after stop
    # bad input and unknown models are the client's mistakes: no log line for any request at INFO
    per_request = [r.getMessage() for r in caplog.records if r.name.startswith("mobiserve.server.transport")]
    assert per_request == []


def test_failure_lines_are_throttled_and_say_how_many_were_left_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    errors = ErrorLog(logging.getLogger("mobiserve.test.errorlog"), interval_s=1.0, clock=lambda: now[0])
    with caplog.at_level(logging.DEBUG, logger="mobiserve.test.errorlog"):
        for i in range(100):
            errors.failed(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", model="m", method="Classify", request_id=str(i)
            )
        errors.failed(grpc.StatusCode.INTERNAL, "boom", model="m", method="Classify", request_id="x")
        errors.failed(grpc.StatusCode.INVALID_ARGUMENT, "bad image", model="m", method="Classify", request_id="y")
        now[0] = 1.5
        errors.failed(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", model="m", method="Classify", request_id="late")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == ["WARNING", "ERROR", "DEBUG", "WARNING"]
    assert "request_id='0'" in lines[0][1] and "code=RESOURCE_EXHAUSTED" in lines[0][1]
    assert "request_id='x'" in lines[1][1]
    assert "request_id='late'" in lines[3][1] and "and 99 more like it" in lines[3][1]
