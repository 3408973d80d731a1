"""The transport on its own: deadlines, the stream window, the request id and drain, over real
gRPC against a real server whose models are fakes (`helpers.FakeModel`), so each test decides
when a request is answered, and none needs a model file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from mobiserve.server.app import App
from mobiserve.server.errors import Overloaded
from mobiserve.server.transport.calls import SHUTTING_DOWN, STREAM_WINDOW
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import FakeModel, poll_until, request_of, requests_counted, start_fake_server, status_of_call

IMAGE = b"any bytes: a fake model reads none"
LONG_S = 600.0  # a default timeout no test waits for


async def started(**settings: object) -> tuple[App, FakeModel]:
    model = FakeModel()
    return await start_fake_server(model, **settings), model


def channel(app: App) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")


def encoded_image(*images: bytes) -> InferInput:
    tensor = InferInput("encoded_image", [len(images), 1], "BYTES")
    return tensor.set_data_from_numpy(np.array([[b] for b in images], dtype=np.object_))


# --------------------------------------------------------------------------------- deadlines


async def test_the_model_is_given_the_clients_deadline() -> None:
    app, model = await started(default_timeout_s=LONG_S)
    try:
        async with channel(app) as ch:
            model.gate.clear()
            sent = time.monotonic()
            status = await status_of_call(pb_grpc.ClassifierStub(ch).Classify(request_of(IMAGE), timeout=0.5))
        assert status == grpc.StatusCode.DEADLINE_EXCEEDED
        (arrival,) = model.arrivals
        assert arrival.deadline is not None and arrival.deadline < sent + 60  # the client's, not the default
        await poll_until(lambda: requests_counted(app, "DEADLINE_EXCEEDED", model="fake") == 1, timeout_s=10)
    finally:
        model.gate.set()
        await app.stop(grace_s=5)


async def test_without_a_client_deadline_the_default_timeout_ends_the_request() -> None:
    app, model = await started(default_timeout_s=0.3)
    try:
        async with channel(app) as ch:
            model.gate.clear()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pb_grpc.ClassifierStub(ch).Classify(request_of(IMAGE))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" in (err.value.details() or "")
        assert requests_counted(app, "DEADLINE_EXCEEDED", model="fake") == 1
    finally:
        model.gate.set()
        await app.stop(grace_s=5)


async def test_the_timeout_parameter_is_the_deadline_when_it_comes_first() -> None:
    app, model = await started(default_timeout_s=LONG_S)
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{app.port}")
    try:
        model.gate.clear()
        sent = time.monotonic()
        with pytest.raises(InferenceServerException) as err:
            # a minute for the call, a third of a second for the request
            await client.infer("fake_image", [encoded_image(IMAGE)], timeout=300_000, client_timeout=60)
        assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED" and "deadline" in err.value.message()
        (arrival,) = model.arrivals
        assert arrival.deadline is not None and arrival.deadline < sent + 60
        assert requests_counted(app, "DEADLINE_EXCEEDED", "ModelInfer", "fake") == 1
        model.gate.set()
        answered = await client.infer("fake_image", [encoded_image(IMAGE)], timeout=60_000_000, client_timeout=60)
        assert answered.as_numpy("output").shape == (1, 10)
    finally:
        model.gate.set()
        await client.close()
        await app.stop(grace_s=5)


async def test_each_stream_message_gets_the_default_timeout_and_the_stream_goes_on() -> None:
    app, model = await started(default_timeout_s=0.3)
    try:
        async with channel(app) as ch:
            stream = pb_grpc.ClassifierStub(ch).ClassifyStream(timeout=60)
            model.gate.clear()
            await stream.write(request_of(IMAGE, request_id="held"))
            expired = await stream.read()
            model.gate.set()
            await stream.write(request_of(IMAGE, request_id="then"))
            answered = await stream.read()
            await stream.done_writing()
            assert await stream.code() == grpc.StatusCode.OK
        assert expired.request_id == "held" and expired.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert answered.request_id == "then" and not answered.HasField("error") and len(answered.results) == 1
        assert requests_counted(app, "DEADLINE_EXCEEDED", "ClassifyStream", "fake") == 1
    finally:
        model.gate.set()
        await app.stop(grace_s=5)


# ---------------------------------------------------------------------------- stream window


async def test_a_stream_reads_no_more_than_its_window_ahead_of_its_answers() -> None:
    app, model = await started(default_timeout_s=LONG_S)
    total = STREAM_WINDOW + 8
    try:
        async with channel(app) as ch:
            model.gate.clear()

            async def requests() -> AsyncIterator[pb.ClassifyRequest]:
                for i in range(total):
                    yield request_of(IMAGE, request_id=str(i))

            stream = pb_grpc.ClassifierStub(ch).ClassifyStream(requests(), timeout=60)
            await poll_until(lambda: len(model.arrivals) == STREAM_WINDOW, timeout_s=30)
            # a barrier: once the server has answered a later call on the same connection, it has
            # had every message of the stream to read
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert len(model.arrivals) == STREAM_WINDOW
            model.gate.set()
            answered = {response.request_id async for response in stream}
        assert answered == {str(i) for i in range(total)}
        assert model.most_waiting == STREAM_WINDOW
    finally:
        model.gate.set()
        await app.stop(grace_s=5)


# ------------------------------------------------------------------------------- request ids


async def test_x_request_id_names_a_request_whose_message_has_none(caplog: pytest.LogCaptureFixture) -> None:
    app, model = await started()
    triton = triton_aio.InferenceServerClient(f"127.0.0.1:{app.port}")
    try:
        async with channel(app) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            header = (("x-request-id", "from-header"),)
            assert (await stub.Classify(request_of(IMAGE), metadata=header, timeout=10)).request_id == "from-header"
            own = await stub.Classify(request_of(IMAGE, request_id="own"), metadata=header, timeout=10)
            assert own.request_id == "own"  # the message's wins
            stream = stub.ClassifyStream(metadata=header, timeout=10)
            await stream.write(request_of(IMAGE))
            assert (await stream.read()).request_id == "from-header"
            await stream.done_writing()
            answer = await triton.infer("fake_image", [encoded_image(IMAGE)], headers={"x-request-id": "triton-1"})
            assert answer.get_response().id == "triton-1"
            model.fails_with = lambda: Overloaded("model 'fake' is overloaded; retry later")
            with caplog.at_level(logging.WARNING, logger="mobiserve"):
                assert await status_of_call(stub.Classify(request_of(IMAGE), metadata=header, timeout=10)) == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED
                )
        (line,) = [r.getMessage() for r in caplog.records if "event=request_failed" in r.getMessage()]
        assert "request_id='from-header'" in line and "code=RESOURCE_EXHAUSTED" in line
    finally:
        await triton.close()
        await app.stop(grace_s=5)


# ------------------------------------------------------------------------------------- drain


async def test_drain_answers_what_was_read_and_refuses_the_rest() -> None:
    app, model = await started(default_timeout_s=LONG_S)
    stopping: asyncio.Task[None] | None = None
    try:
        async with channel(app) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            model.gate.clear()
            stream = stub.ClassifyStream(timeout=60)
            await stream.write(request_of(IMAGE, request_id="read-1"))
            await stream.write(request_of(IMAGE, request_id="read-2"))
            unary = asyncio.ensure_future(stub.Classify(request_of(IMAGE, request_id="unary"), timeout=60))
            await poll_until(lambda: len(model.arrivals) == 3, timeout_s=30)
            stopping = asyncio.create_task(app.stop(grace_s=60))
            await poll_until(lambda: app.handling.gate.draining, timeout_s=10)
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await stub.ClassifyStream(timeout=60).read()
            assert late.value.code() == grpc.StatusCode.UNAVAILABLE and SHUTTING_DOWN in (late.value.details() or "")
            late_unary = stub.Classify(request_of(IMAGE), timeout=60)
            assert await status_of_call(late_unary) == grpc.StatusCode.UNAVAILABLE  # while accepted work waits
            assert len(model.arrivals) == 3
            model.gate.set()
            answers = []
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while (response := await stream.read()) != grpc.aio.EOF:
                    answers.append(response)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and SHUTTING_DOWN in (ended.value.details() or "")
            assert {a.request_id for a in answers} == {"read-1", "read-2"}  # all it had read
            assert (await unary).request_id == "unary"  # in flight when the drain began: answered
            await stopping
    finally:
        model.gate.set()
        await (app.stop(grace_s=5) if stopping is None else stopping)
