"""Backpressure, deadlines, cancellation, runtime faults, limits and drain, on a real in-process
server over gRPC.

To decide when a batch runs, the model's one onnxruntime session runs behind a gate the test
opens (`helpers.SessionGate`); the same gate can make one run fail inside onnxruntime itself, by
feeding the real session a tensor of the wrong shape. Everything else is the real server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from mobiserve.server.app import App
from mobiserve.server.transport.calls import SHUTTING_DOWN
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import (
    SessionGate,
    encode,
    model_config,
    png_bomb,
    poll_until,
    request_of,
    requests_counted,
    start_server,
    status_of_call,
)

QUEUE_LIMIT = 8  # images
MAX_IMAGES = 8
MAX_PIXELS = 1_000_000
MAX_MESSAGE = 4 << 20


async def start_gated(int8_model: Path, **settings: object) -> tuple[App, SessionGate]:
    gate = SessionGate()
    app = await start_server(
        # one session, and spinning on: no separate small-batch session, so the gate sees every batch
        model_config(int8_model, instances=1, max_batch_size=8, max_queue_size=QUEUE_LIMIT, allow_spinning=True),
        gates={"int8": gate},
        max_images_per_request=MAX_IMAGES,
        max_pixels=MAX_PIXELS,
        max_message_bytes=MAX_MESSAGE,
        **settings,
    )
    return app, gate


@pytest_asyncio.fixture(scope="module")
async def gated(int8_model: Path) -> AsyncIterator[tuple[App, SessionGate]]:
    app, session = await start_gated(int8_model)
    yield app, session
    await app.stop(grace_s=5)


@pytest_asyncio.fixture(scope="module")
async def gated_stub(gated: tuple[App, SessionGate]) -> AsyncIterator[pb_grpc.ClassifierStub]:
    options = [("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gated[0].port}", options=options) as channel:
        yield pb_grpc.ClassifierStub(channel)


@pytest.fixture(scope="module")
def images(sample_images: list[Path]) -> list[bytes]:
    return [p.read_bytes() for p in sample_images[:16]]


async def top1(stub: pb_grpc.ClassifierStub, image: bytes) -> int:
    return int((await stub.Classify(request_of(image), timeout=60)).results[0].classes[0].index)


# ------------------------------------------------------------------------------------ faults


async def test_an_onnxruntime_failure_fails_only_its_batch(
    gated: tuple[App, SessionGate],
    gated_stub: pb_grpc.ClassifierStub,
    images: list[bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    app, session = gated
    expected = [await top1(gated_stub, b) for b in images[:3]]
    with caplog.at_level(logging.INFO, logger="mobiserve"), session.closed():
        session.fail_next = True
        doomed = asyncio.ensure_future(gated_stub.Classify(request_of(*images[:2], request_id="doomed"), timeout=60))
        await session.wait_entered()  # its batch (both images) holds the session
        later = [asyncio.ensure_future(gated_stub.Classify(request_of(b), timeout=60)) for b in images[:3]]
        session.gate.set()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await doomed
        answers = await asyncio.gather(*later)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "inference failed for this batch" in (err.value.details() or "")
    assert "ONNXRuntimeError" in (err.value.details() or "")  # the reason, from onnxruntime itself
    assert [a.results[0].classes[0].index for a in answers] == expected  # later batches ran
    assert await top1(gated_stub, images[0]) == expected[0]
    failed = [r for r in caplog.records if "event=batch_failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelno == logging.ERROR and "ONNXRuntimeError" in failed[0].getMessage()
    request_lines = [r for r in caplog.records if "event=request_failed" in r.getMessage()]
    assert [r.levelno for r in request_lines] == [logging.ERROR], [r.getMessage() for r in request_lines]
    assert "request_id='doomed'" in request_lines[0].getMessage() and "model=int8" in request_lines[0].getMessage()


# ------------------------------------------------------------------------------- backpressure


async def test_a_full_queue_refuses_at_once_then_recovers(
    gated: tuple[App, SessionGate], gated_stub: pb_grpc.ClassifierStub, images: list[bytes]
) -> None:
    app, session = gated
    model = app.served[0]
    refused_before = requests_counted(app, "RESOURCE_EXHAUSTED")
    with session.closed():
        running = asyncio.ensure_future(gated_stub.Classify(request_of(images[0], request_id="running"), timeout=60))
        await session.wait_held(1)
        spare = asyncio.ensure_future(gated_stub.Classify(request_of(images[1], request_id="spare"), timeout=60))
        await session.wait_held(2)  # the regular and the spare session are busy: nothing leaves the queue now
        # one stream, so the server reads (and admits) in this order: the first fills the
        # interactive lane (streams are bulk unless they ask otherwise)
        stream = gated_stub.ClassifyStream(timeout=60)
        interactive = pb.PRIORITY_INTERACTIVE
        await stream.write(request_of(*images[:QUEUE_LIMIT], request_id="fills", priority=interactive))
        await stream.write(request_of(images[0], request_id="over", priority=interactive))
        refusal = await stream.read()  # arrives while nothing can finish: refused without waiting
        assert refusal.request_id == "over" and refusal.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "overloaded" in refusal.error.message and f"limit {QUEUE_LIMIT}" in refusal.error.message
        flood = await asyncio.gather(*(status_of_call(gated_stub.Classify(request_of(b), timeout=60)) for b in images))
        assert set(flood) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert model.queued() == QUEUE_LIMIT
    filled = await stream.read()
    await stream.done_writing()
    assert filled.request_id == "fills" and len(filled.results) == QUEUE_LIMIT and not filled.HasField("error")
    assert (await running).request_id == "running" and (await spare).request_id == "spare"
    assert await stream.code() == grpc.StatusCode.OK
    # recovered: as much as the queue holds, at once, is all served
    again = await asyncio.gather(
        *(status_of_call(gated_stub.Classify(request_of(b), timeout=60)) for b in images[:QUEUE_LIMIT])
    )
    assert set(again) == {grpc.StatusCode.OK}
    assert model.queued() == 0
    assert requests_counted(app, "RESOURCE_EXHAUSTED") - refused_before == len(images)  # the unary refusals
    assert app.metrics.registry.get_sample_value("mobiserve_queue_depth_images", {"model": "int8"}) == 0


# ------------------------------------------------------------------- deadlines, cancellation


async def test_cancelled_and_expired_requests_never_reach_the_model(
    gated: tuple[App, SessionGate], gated_stub: pb_grpc.ClassifierStub, images: list[bytes]
) -> None:
    app, session = gated
    deadline_before = requests_counted(app, "DEADLINE_EXCEEDED")
    cancelled_before = requests_counted(app, "CANCELLED")
    with session.closed():
        running = asyncio.ensure_future(gated_stub.Classify(request_of(images[0]), timeout=60))
        await session.wait_held(1)
        spare = asyncio.ensure_future(gated_stub.Classify(request_of(images[2]), timeout=60))
        await session.wait_held(2)  # the regular and the spare session are busy: the rest queues
        runs_before = len(session.batch_sizes)
        cancelled = gated_stub.Classify(request_of(*images[:3]), timeout=60)
        expired = gated_stub.Classify(request_of(*images[:2]), timeout=0.5)
        kept = asyncio.ensure_future(gated_stub.Classify(request_of(images[1]), timeout=60))
        assert await status_of_call(expired) == grpc.StatusCode.DEADLINE_EXCEEDED
        cancelled.cancel()  # sent half a second ago: it is waiting in the server's queue
        assert await cancelled.code() == grpc.StatusCode.CANCELLED
        # a barrier: the cancellation travels ahead of this call on the same connection, so once
        # it is answered the server has seen it (the gate is still closed: nothing has run)
        await gated_stub.ListModels(pb.ListModelsRequest(), timeout=30)
    await running
    await spare
    await kept
    # after the blocked runs: only `kept` (one image) ran; the 5 images of the others never did
    assert session.batch_sizes[runs_before:] == [1, 1, 1]
    assert requests_counted(app, "DEADLINE_EXCEEDED") - deadline_before == 1
    assert requests_counted(app, "CANCELLED") - cancelled_before == 1
    assert app.served[0].queued() == 0


async def test_the_default_timeout_applies_when_the_client_sets_none(int8_model: Path, images: list[bytes]) -> None:
    app, session = await start_gated(int8_model, default_timeout_s=0.5)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb_grpc.ClassifierStub(channel)
            with session.closed():
                running = asyncio.ensure_future(stub.Classify(request_of(images[0]), timeout=60))
                await session.wait_held(1)
                spare = asyncio.ensure_future(stub.Classify(request_of(images[2]), timeout=60))
                await session.wait_held(2)  # the regular and the spare session are busy
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Classify(request_of(images[1]))  # no deadline: the server's applies
            await running
            await spare
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in (err.value.details() or "")
        assert session.batch_sizes == [1, 1]  # the two that held the sessions; the expired request never ran
        assert requests_counted(app, "DEADLINE_EXCEEDED") == 1
    finally:
        await app.stop(grace_s=5)


# ------------------------------------------------------------------------------------ limits


def too_many_pixels_png() -> bytes:
    """Header says 1100x1000 (over MAX_PIXELS); the data is truncated, so only a refusal made
    from the header can produce the 'megapixels' message."""
    full = encode(Image.new("RGB", (1100, 1000), (120, 30, 200)), "PNG")
    return full[: len(full) // 2]


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("message too large", grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        ("too many images", grpc.StatusCode.INVALID_ARGUMENT, f"the limit is {MAX_IMAGES}"),
        ("too many pixels: jpeg", grpc.StatusCode.INVALID_ARGUMENT, "over the limit of 1.0"),
        ("too many pixels: png header", grpc.StatusCode.INVALID_ARGUMENT, "refused before decoding"),
        ("too many pixels: tensor", grpc.StatusCode.INVALID_ARGUMENT, "over the limit of 1.0"),
        ("decompression bomb", grpc.StatusCode.INVALID_ARGUMENT, "megapixels"),
    ],
)
async def test_each_limit_is_a_clear_refusal(
    gated_stub: pb_grpc.ClassifierStub, images: list[bytes], case: str, code: grpc.StatusCode, words: str
) -> None:
    big_jpeg = encode(Image.new("RGB", (1200, 1000), (10, 200, 30)), "JPEG")
    side = 1001
    requests = {
        "message too large": request_of(images[0] + bytes(MAX_MESSAGE)),
        "too many images": request_of(*[images[0]] * (MAX_IMAGES + 1)),
        "too many pixels: jpeg": request_of(big_jpeg),
        "too many pixels: png header": request_of(too_many_pixels_png()),
        "too many pixels: tensor": pb.ClassifyRequest(
            images=[pb.Image(tensor=pb.Tensor(shape=[side, side, 3], dtype="uint8", data=bytes(side * side * 3)))]
        ),
        "decompression bomb": request_of(png_bomb()),
    }
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gated_stub.Classify(requests[case], timeout=60)
    assert err.value.code() == code, err.value.details()
    assert words in (err.value.details() or ""), err.value.details()
    assert len((await gated_stub.Classify(request_of(images[0]), timeout=60)).results) == 1  # still serving


def test_limits_and_knobs_come_from_the_serve_flags(int8_model: Path) -> None:
    from mobiserve.common.command import build_parser
    from mobiserve.server.cli import _server_config

    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            str(int8_model),
            "--max-queue-size",
            "7",
            "--max-message-mb",
            "2.5",
            "--max-images-per-request",
            "3",
            "--max-pixels",
            "1234567",
            "--default-timeout",
            "4",
            "--grace-period",
            "9",
            "--metrics-port",
            "9100",
        ]
    )
    config = _server_config(args)
    assert (config.max_message_bytes, config.max_images_per_request, config.max_pixels) == (
        int(2.5 * 2**20),
        3,
        1234567,
    )
    assert (config.default_timeout_s, config.grace_s, config.metrics_port) == (4, 9, 9100)
    assert config.models[0].max_queue_size == 7
    assert config.host == "127.0.0.1"  # local only unless told


# ------------------------------------------------------------------------------------- drain


async def test_drain_answers_what_is_in_flight_and_refuses_the_rest(int8_model: Path, images: list[bytes]) -> None:
    app, session = await start_gated(int8_model)
    model = app.served[0]
    target = f"127.0.0.1:{app.port}"
    stopping: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            stub, health = pb_grpc.ClassifierStub(channel), health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service="mobiserve.v1.Classifier"), timeout=60)
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            with session.closed():
                stream = stub.ClassifyStream(timeout=60)
                await stream.write(request_of(images[0], request_id="read-1"))
                await session.wait_entered()  # read-1 is in the session
                await stream.write(request_of(images[1], request_id="read-2"))
                unary = asyncio.ensure_future(stub.Classify(request_of(images[2]), timeout=60))
                # both accepted: read-2 queued in its (bulk) lane, the unary call on the spare session
                await poll_until(lambda: model.queued() == 1 and session.held == 2, timeout_s=60)
                stopping = asyncio.create_task(app.stop(grace_s=60))
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
                late_stream = stub.ClassifyStream(timeout=60)
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await late_stream.read()
                assert late.value.code() == grpc.StatusCode.UNAVAILABLE and SHUTTING_DOWN in (
                    late.value.details() or ""
                )
                late_unary = await status_of_call(stub.Classify(request_of(images[3]), timeout=60))
                assert late_unary == grpc.StatusCode.UNAVAILABLE  # at once, while accepted work still waits
            answers = []
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while (response := await stream.read()) != grpc.aio.EOF:
                    answers.append(response)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and SHUTTING_DOWN in (ended.value.details() or "")
            assert {a.request_id for a in answers} == {"read-1", "read-2"}  # all it had read
            assert all(not a.HasField("error") and len(a.results) == 1 for a in answers)
            assert len((await unary).results) == 1  # in flight at the signal: answered
            await stopping
            after = await status_of_call(stub.Classify(request_of(images[0]), timeout=10))
            assert after == grpc.StatusCode.UNAVAILABLE
    finally:
        session.gate.set()
        if stopping is None:
            await app.stop(grace_s=5)
        else:
            await stopping
