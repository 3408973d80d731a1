"""Priorities end to end, on real in-process servers over gRPC: which lane serves a request, what
a bad priority gets, and how a stream is held back, by a full bulk lane or by answers its client
has not read. The order in which a model's lanes are served is tested on the batcher alone
(test_lanes.py), where the test decides when each batch runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
import tritonclient.grpc.aio as triton_aio

from mobiserve.client import AsyncClient
from mobiserve.inference import grpc_service_pb2 as oip_pb
from mobiserve.inference import grpc_service_pb2_grpc as oip_grpc
from mobiserve.server.app import App
from mobiserve.server.transport.calls import STREAM_WINDOW
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import SessionGate, model_config, poll_until, request_of, start_server

INTERACTIVE, BULK = pb.PRIORITY_INTERACTIVE, pb.PRIORITY_BULK


@pytest_asyncio.fixture(scope="module")
async def app(int8_model: Path) -> AsyncIterator[App]:
    served = await start_server(model_config(int8_model, max_batch_size=8))
    yield served
    await served.stop(grace_s=5)


@pytest_asyncio.fixture(scope="module")
async def stub(app: App) -> AsyncIterator[pb_grpc.ClassifierStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield pb_grpc.ClassifierStub(channel)


def lane_images(app: App, lane: str) -> float:
    labels = {"model": "int8", "lane": lane}
    return app.metrics.registry.get_sample_value("mobiserve_lane_images_total", labels) or 0.0


def paused(app: App, reason: str) -> float:
    return app.metrics.registry.get_sample_value("mobiserve_streams_paused", {"reason": reason}) or 0.0


async def streamed(stub: pb_grpc.ClassifierStub, *requests: pb.ClassifyRequest) -> list[pb.ClassifyResponse]:
    """Each request on one stream, answered in completion order."""
    call = stub.ClassifyStream(timeout=60)
    for request in requests:
        await call.write(request)
    await call.done_writing()
    return [answer async for answer in call]


async def test_unary_calls_are_interactive_and_stream_messages_bulk_unless_they_ask(
    app: App, stub: pb_grpc.ClassifierStub, jpeg: bytes
) -> None:
    before = {lane: lane_images(app, lane) for lane in ("interactive", "bulk")}
    assert (await stub.Classify(request_of(jpeg), timeout=60)).timing.lane == INTERACTIVE
    assert (await stub.Classify(request_of(jpeg, priority=BULK), timeout=60)).timing.lane == BULK
    answers = await streamed(
        stub, request_of(jpeg, request_id="default"), request_of(jpeg, jpeg, request_id="asks", priority=INTERACTIVE)
    )
    assert {a.request_id: a.timing.lane for a in answers} == {"default": BULK, "asks": INTERACTIVE}
    assert {lane: lane_images(app, lane) - before[lane] for lane in before} == {"interactive": 3, "bulk": 2}


async def test_an_unknown_priority_is_refused_naming_the_values_there_are(
    stub: pb_grpc.ClassifierStub, jpeg: bytes
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Classify(request_of(jpeg, priority=7), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "priority is 7" in (refused.value.details() or "") and "2 (PRIORITY_BULK)" in (refused.value.details() or "")
    answers = await streamed(
        stub,
        request_of(jpeg, request_id="bad", priority=-1),
        request_of(jpeg, request_id="good"),
    )
    by_id = {a.request_id: a for a in answers}
    assert (
        by_id["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        and "priority is -1" in by_id["bad"].error.message
    )
    assert not by_id["good"].HasField("error") and by_id["good"].timing.lane == BULK  # the stream went on


async def test_the_inference_service_reads_priority_as_triton_does(app: App, jpeg: bytes) -> None:
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{app.port}")
    image = triton_aio.InferInput("encoded_image", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[jpeg]], dtype=np.object_))
    try:
        for level, lane in ((1, "interactive"), (2, "bulk"), (0, "interactive"), (99, "interactive")):
            before = lane_images(app, lane)
            await client.infer("int8_image", [image], priority=level)  # 99: above the levels, the default
            assert lane_images(app, lane) == before + 1, level
        batching = (await client.get_model_config("int8")).config.dynamic_batching
        assert (batching.priority_levels, batching.default_priority_level) == (2, 0)
        limits = {level: policy.max_queue_size for level, policy in batching.priority_queue_policy.items()}
        assert limits == {1: 1024, 2: 64}
    finally:
        await client.close()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        request = oip_pb.ModelInferRequest(model_name="int8_image")
        request.parameters["priority"].int64_param = -1
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'priority' is -1" in (
        refused.value.details() or ""
    )


async def test_the_client_asks_for_a_lane_and_says_which_one_served(app: App, jpeg: bytes) -> None:
    async with AsyncClient(f"127.0.0.1:{app.port}") as client:
        assert (await client.classify(jpeg)).timing.lane == "interactive"
        assert (await client.classify(jpeg, priority="bulk")).timing.lane == "bulk"
        assert [r.timing.lane async for r in client.classify_many([jpeg, jpeg])] == ["bulk", "bulk"]
        assert [r.timing.lane async for r in client.classify_many([jpeg], priority="interactive")] == ["interactive"]
        with pytest.raises(ValueError, match="priority must be"):
            await client.classify(jpeg, priority="urgent")  # type: ignore[arg-type]


async def test_a_stream_whose_bulk_lane_is_full_is_not_read_until_there_is_room(
    int8_model: Path, sample_images: list[Path]
) -> None:
    gate = SessionGate()
    app = await start_server(
        model_config(int8_model, instances=1, bulk_max_queue_size=2, bulk_max_batch_size=1), gates={"int8": gate}
    )
    model = app.served[0]
    images = [p.read_bytes() for p in sample_images[:12]]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stream = pb_grpc.ClassifierStub(channel).ClassifyStream(timeout=120)
            with gate.closed():
                for i, image in enumerate(images):
                    await stream.write(request_of(image, request_id=str(i)))
                # one message runs (held), two fill the bulk lane, one waits for room: not read on
                await poll_until(lambda: paused(app, "lane") == 1 and gate.held == 1, timeout_s=60)
                assert model.queued("bulk") == 2
            await stream.done_writing()
            answers = [answer async for answer in stream]
        assert sorted(int(a.request_id) for a in answers) == list(range(len(images)))  # each once
        assert all(a.timing.lane == BULK and not a.HasField("error") for a in answers)
        assert (paused(app, "lane"), model.queued()) == (0, 0)
    finally:
        await app.stop(grace_s=5)


async def test_a_stream_whose_client_does_not_read_stops_being_read(app: App, jpeg: bytes) -> None:
    """Answers wait for a client that does not read them, holding their place in the stream's
    window: once the window is full the server reads no more, so a stream that only writes costs
    the server the window's answers, not every message it sends."""
    sent = 4 * STREAM_WINDOW
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stream = pb_grpc.ClassifierStub(channel).ClassifyStream(timeout=120)

        async def write() -> None:
            for i in range(sent):  # each answer lists all 1,000 classes: about 40 KB
                await stream.write(request_of(jpeg, request_id=str(i), top_k=1000))
            await stream.done_writing()

        writer = asyncio.create_task(write())
        await poll_until(lambda: paused(app, "window") == 1, timeout_s=120)
        assert not writer.done()  # the server stopped reading; flow control holds the client back
        answers = []
        async for answer in stream:  # now the client reads: the stream goes on to the end
            answers.append(answer)
        await writer
    assert sorted(int(a.request_id) for a in answers) == list(range(sent))
    assert all(len(a.results[0].classes) == 1000 for a in answers)
    assert paused(app, "window") == 0
