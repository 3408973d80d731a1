"""Two models in one server: each answers by name, and a model held up does not hold up the other.

`pytest tests/test_multi_model.py -s` prints the int8 latencies behind docs/model-card.md's
statement on sharing CPU threads between models.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from mobiserve.server.app import App
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import SessionGate, model_config, request_of, start_server

FLOOD_CLIENTS = 4
FLOOD_REQUESTS = 12  # per client
FLOOD_IMAGES = 8  # per request: 4 x 12 x 8 = 384 fp32 images
PROBES = 10  # single-image int8 requests, one after another


@pytest.fixture(scope="module")
def fp32_gate() -> SessionGate:
    return SessionGate()


@pytest_asyncio.fixture(scope="module")
async def two_models(int8_model: Path, fp32_model: Path, fp32_gate: SessionGate) -> AsyncIterator[App]:
    """Both models with the defaults `mobiserve serve --model int8=... --model fp32=...` uses;
    fp32's sessions run behind a gate (open unless a test closes it)."""
    app = await start_server(
        model_config(int8_model, name="int8"), model_config(fp32_model, name="fp32"), gates={"fp32": fp32_gate}
    )
    yield app
    await app.stop(grace_s=5)


@pytest_asyncio.fixture
async def client(two_models: App) -> AsyncIterator[pb_grpc.ClassifierStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{two_models.port}") as channel:
        yield pb_grpc.ClassifierStub(channel)


async def test_each_model_answers_by_name(client: pb_grpc.ClassifierStub, sample_images: list[Path]) -> None:
    images = [p.read_bytes() for p in sample_images[:4]]
    default = await client.Classify(request_of(*images), timeout=60)
    by_name = {name: await client.Classify(request_of(*images, model=name), timeout=60) for name in ("int8", "fp32")}
    assert default.model == "int8"  # the first model is the default
    assert {name: r.model for name, r in by_name.items()} == {"int8": "int8", "fp32": "fp32"}
    assert [r.classes[0].index for r in default.results] == [r.classes[0].index for r in by_name["int8"].results]
    assert all(len(r.results) == len(images) for r in by_name.values())


async def test_list_models_shows_both(client: pb_grpc.ClassifierStub, int8_model: Path, fp32_model: Path) -> None:
    models = {m.name: m for m in (await client.ListModels(pb.ListModelsRequest(), timeout=10)).models}
    assert set(models) == {"int8", "fp32"}
    assert models["int8"].is_default and not models["fp32"].is_default


async def test_unknown_model_is_not_found(client: pb_grpc.ClassifierStub, jpeg: bytes) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.Classify(request_of(jpeg, model="fp16"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "fp16" in (caught.value.details() or "") and "int8" in (caught.value.details() or "")


async def _probe(client: pb_grpc.ClassifierStub, image: bytes) -> list[float]:
    """Seconds per single-image int8 request, sent one after another."""
    seconds = []
    for _ in range(PROBES):
        started = time.perf_counter()
        reply = await client.Classify(request_of(image, model="int8"), timeout=120)
        seconds.append(time.perf_counter() - started)
        assert reply.model == "int8"
    return seconds


async def test_a_model_held_up_does_not_hold_up_the_other(
    client: pb_grpc.ClassifierStub, fp32_gate: SessionGate, sample_images: list[Path]
) -> None:
    """fp32's sessions are held: its requests wait, and int8 answers meanwhile (each model has its
    own batcher, queue and sessions)."""
    image = sample_images[0].read_bytes()
    with fp32_gate.closed():
        held = [asyncio.ensure_future(client.Classify(request_of(image, model="fp32"), timeout=120)) for _ in range(4)]
        await fp32_gate.wait_entered()
        answers = [await client.Classify(request_of(image, model="int8"), timeout=60) for _ in range(PROBES)]
        assert not any(call.done() for call in held)  # int8 did not wait for them
    assert {a.model for a in answers} == {"int8"}
    assert {(await call).model for call in held} == {"fp32"}


@pytest.mark.slow
async def test_a_flooded_model_leaves_the_other_its_latency(
    client: pb_grpc.ClassifierStub, sample_images: list[Path]
) -> None:
    """Flood fp32 with 384 images while int8 takes 10 single-image requests, and print int8's
    latencies, idle and under the flood (what docs/model-card.md states)."""
    probe_image = sample_images[0].read_bytes()
    flood_images = [p.read_bytes() for p in sample_images[1 : 1 + FLOOD_IMAGES]]
    idle = await _probe(client, probe_image)

    flooding = asyncio.Event()

    async def flood_client() -> int:
        served = 0
        for _ in range(FLOOD_REQUESTS):
            reply = await client.Classify(request_of(*flood_images, model="fp32"), timeout=300)
            served += len(reply.results)
            flooding.set()
        return served

    started = time.perf_counter()
    flood = [asyncio.create_task(flood_client()) for _ in range(FLOOD_CLIENTS)]
    await flooding.wait()  # the first fp32 batch is back: the flood is in full swing
    busy = await _probe(client, probe_image)
    still_flooding = sum(not task.done() for task in flood)
    served = sum(await asyncio.gather(*flood))
    flood_s = time.perf_counter() - started

    print(
        f"\nint8 batch-1 request latency, median of {PROBES}: idle {statistics.median(idle) * 1e3:.1f} ms, "
        f"while fp32 is flooded {statistics.median(busy) * 1e3:.1f} ms (max {max(busy) * 1e3:.1f} ms); "
        f"fp32 flood: {served} images in {flood_s:.1f} s = {served / flood_s:.0f} images/s; "
        f"{still_flooding}/{FLOOD_CLIENTS} flood clients still waiting when int8 was done"
    )
    assert served == FLOOD_CLIENTS * FLOOD_REQUESTS * FLOOD_IMAGES
