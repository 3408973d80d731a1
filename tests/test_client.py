"""mobiserve.client against the shared in-process server: inputs, streaming, errors, deadlines.

The blocking `Client` runs through asyncio.to_thread, so the server (on this event loop) keeps
serving while it waits.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobiserve.client import (
    AsyncClient,
    Classification,
    Client,
    DeadlineExceeded,
    ImageLike,
    InvalidArgument,
    InvalidImage,
    MobiserveError,
    ModelNotFound,
    Overloaded,
    RetryPolicy,
)
from mobiserve.server.app import App
from mobiserve.server.errors import Overloaded as ServerOverloaded

from helpers import FakeModel, card_pipeline, encode, png_bomb, requests_counted, start_fake_server, tcp_connections


def target_of(server: App) -> str:
    return f"127.0.0.1:{server.port}"


def indices(result: Classification) -> list[int]:
    return [c.index for c in result.classes]


async def test_every_input_type_gets_the_same_answer_from_both_clients(server: App, sample_images: list[Path]) -> None:
    path = sample_images[5]
    data = path.read_bytes()
    picture = Image.open(path)
    grey = picture.convert("L")
    same_pixels: dict[str, ImageLike] = {
        "str path": str(path),
        "Path": path,
        "bytes": data,
        "PIL image": picture,
        "uint8 array": np.asarray(picture.convert("RGB")),
    }
    with Client(target_of(server)) as client:
        async with AsyncClient(target_of(server)) as aclient:
            expected = await aclient.classify(data)
            for name, image in same_pixels.items():
                assert (await aclient.classify(image)).classes == expected.classes, name
                assert (await asyncio.to_thread(client.classify, image)).classes == expected.classes, name
            model_input = card_pipeline(data)  # float32 [3, 224, 224]
            assert indices(await aclient.classify(model_input)) == indices(expected)
            assert indices(await asyncio.to_thread(client.classify, model_input)) == indices(expected)
            # a PIL image in another mode is converted to RGB as the server converts a decoded file
            grey_file = await aclient.classify(encode(grey, "PNG"))
            assert (await aclient.classify(grey)).classes == grey_file.classes
    assert expected.model == "int8" and len(expected.classes) == 5
    assert expected.request_id and expected.timing.batch_size >= 1 and expected.timing.inference_us > 0
    assert expected.top == expected.classes[0]


async def test_top_k_model_and_list_models(server: App, jpeg: bytes) -> None:
    async with AsyncClient(target_of(server)) as client:
        result = await client.classify(jpeg, top_k=12, model="int8")
        models = await client.list_models()
    assert len(result.classes) == 12
    scores = [c.score for c in result.classes]
    assert scores == sorted(scores, reverse=True)
    described = [(m.name, m.is_default, m.num_classes, m.input_shape) for m in models]
    assert described == [("int8", True, 1000, (-1, 3, 224, 224))]


@pytest.mark.slow
async def test_classify_many_over_the_sample_matches_unary_exactly(server: App, sample_images: list[Path]) -> None:
    async with AsyncClient(target_of(server)) as aclient:
        unary = await asyncio.gather(*(aclient.classify(p) for p in sample_images))
        some = sample_images[:64]
        as_completed = [r async for r in aclient.classify_many(some, ordered=False, max_in_flight=16)]
    with Client(target_of(server)) as client:
        ordered = await asyncio.to_thread(lambda: list(client.classify_many(sample_images)))
    expected = [r.classes for r in unary]
    assert [r.classes for r in ordered] == expected
    assert [r.input_index for r in ordered] == list(range(len(sample_images)))
    assert sorted(r.input_index for r in as_completed) == list(range(len(some)))
    assert all(r.classes == expected[r.input_index] for r in as_completed)


async def test_classify_many_reads_no_further_ahead_than_its_window(server: App, jpeg: bytes) -> None:
    """An endless input: the client never holds more than max_in_flight images it has not handed out."""
    window, wanted = 4, 24
    pulled = itertools.count()
    taken: list[int] = []

    def endless() -> Iterator[bytes]:
        while True:
            taken.append(next(pulled))
            yield jpeg

    def consume() -> None:
        with Client(target_of(server)) as client:
            for n, _ in enumerate(client.classify_many(endless(), max_in_flight=window), 1):
                assert len(taken) <= n + window
                if n == wanted:
                    break

    await asyncio.to_thread(consume)

    async def endless_async() -> AsyncIterator[bytes]:
        while True:
            taken.append(next(pulled))
            yield jpeg

    taken.clear()
    async with AsyncClient(target_of(server)) as aclient:
        results = aclient.classify_many(endless_async(), max_in_flight=window)
        n = 0
        async for _ in results:
            n += 1
            assert len(taken) <= n + window
            if n == wanted:
                break
        await results.aclose()  # type: ignore[attr-defined]


def cases(jpeg: bytes) -> dict[str, tuple[object, dict[str, object], type[BaseException], str]]:
    """name: (image, classify keywords, exception, words in its message)."""
    return {
        "random bytes": (os.urandom(5000), {}, InvalidImage, "not a decodable image"),
        "truncated jpeg": (jpeg[: len(jpeg) // 3], {}, InvalidImage, "JPEG"),
        "1x1 image": (encode(Image.new("RGB", (1, 1)), "PNG"), {}, InvalidImage, "at least"),
        "decompression bomb": (png_bomb(), {}, InvalidImage, "megapixels"),
        "array of wrong shape": (np.zeros((3, 10, 10), np.float32), {}, InvalidImage, "shape"),
        "array of wrong dtype": (np.zeros((32, 32, 3), np.float64), {}, InvalidImage, "dtype"),
        "array with NaN": (np.full((3, 224, 224), np.nan, np.float32), {}, InvalidImage, "NaN"),
        "unknown model": (jpeg, {"model": "no-such-model"}, ModelNotFound, "no-such-model"),
        "top_k over the classes": (jpeg, {"top_k": 1001}, InvalidArgument, "top_k"),
        "top_k zero": (jpeg, {"top_k": 0}, ValueError, "top_k"),
        "missing file": ("/nonexistent/cat.jpg", {}, FileNotFoundError, "cat.jpg"),
        "not an image type": (12345, {}, TypeError, "int"),
    }


@pytest.mark.parametrize("name", list(cases(b"").keys()))
async def test_each_bad_input_raises_its_typed_error(server: App, jpeg: bytes, name: str) -> None:
    image, keywords, kind, words = cases(jpeg)[name]
    async with AsyncClient(target_of(server)) as client:
        with pytest.raises(kind) as raised:
            await client.classify(image, **keywords)  # type: ignore[arg-type]
        assert type(raised.value) is kind  # InvalidArgument is not an InvalidImage, and so on
        assert words in str(raised.value)
        if isinstance(raised.value, MobiserveError):
            assert raised.value.code.name in str(raised.value) and words in raised.value.message
        assert len((await client.classify(jpeg)).classes) == 5  # and the server still serves


async def test_a_bad_image_in_a_stream_fails_at_its_turn_after_the_good_ones(server: App, jpeg: bytes) -> None:
    async with AsyncClient(target_of(server)) as client:
        got: list[Classification] = []
        with pytest.raises(InvalidImage) as raised:
            async for result in client.classify_many([jpeg, jpeg, b"junk", jpeg]):
                got.append(result)
    assert [r.input_index for r in got] == [0, 1]
    assert raised.value.input_index == 2 and "input 2" in str(raised.value)

    def local_failure() -> list[int]:  # a missing file ends the stream; what was sent is answered
        seen: list[int] = []
        with Client(target_of(server)) as c, pytest.raises(FileNotFoundError):
            for result in c.classify_many([jpeg, jpeg, "/nonexistent.jpg", jpeg]):
                seen.append(result.input_index)
        return seen

    assert await asyncio.to_thread(local_failure) == [0, 1]


async def test_a_tiny_deadline_on_a_large_batch_expires(server: App, sample_images: list[Path], jpeg: bytes) -> None:
    with Client(target_of(server)) as client:
        with pytest.raises(DeadlineExceeded) as raised:
            await asyncio.to_thread(lambda: list(client.classify_many(sample_images, timeout=0.001)))
        assert raised.value.code.name == "DEADLINE_EXCEEDED"
        with pytest.raises(DeadlineExceeded):
            await asyncio.to_thread(client.classify, np.zeros((3000, 2000, 3), np.uint8), timeout=0.001)
        assert len((await asyncio.to_thread(client.classify, jpeg)).classes) == 5


async def test_a_full_queue_is_overloaded_after_grpc_retried_it(jpeg: bytes) -> None:
    model = FakeModel()
    app = await start_fake_server(model)
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)
    model.fails_with = lambda: ServerOverloaded(
        "model 'fake' is overloaded: 1024 images queued, limit 1024; retry later"
    )
    try:
        async with AsyncClient(target_of(app), retry=None) as client:
            with pytest.raises(Overloaded, match="overloaded"):
                await client.classify(jpeg)
            with pytest.raises(Overloaded) as raised:
                async for _ in client.classify_many([jpeg]):
                    pass
            assert raised.value.input_index == 0
        assert requests_counted(app, "RESOURCE_EXHAUSTED", model="fake") == 1  # stream requests count as ClassifyStream
        async with AsyncClient(target_of(app), retry=retry) as client:
            with pytest.raises(Overloaded):
                await client.classify(jpeg)
        assert requests_counted(app, "RESOURCE_EXHAUSTED", model="fake") == 1 + retry.max_attempts
        model.fails_with = None  # room again
        async with AsyncClient(target_of(app), retry=retry) as client:
            assert len((await client.classify(jpeg)).classes) == 5
    finally:
        await app.stop(grace_s=5)


def test_a_request_over_the_message_limit_is_refused_before_sending(jpeg: bytes) -> None:
    with Client("127.0.0.1:1", max_message_bytes=len(jpeg) // 2) as client:  # nothing listens there
        with pytest.raises(InvalidImage, match="max_message_bytes"):
            client.classify(jpeg)


def established_to(port: int) -> set[int]:
    """This machine's open TCP connections to `port`, by local port: a set, so that connections
    other tests left closing do not count."""
    return {local for local, remote, state in tcp_connections(port) if remote == port and state == "ESTABLISHED"}


async def test_connections_opens_that_many_connections_and_spreads_calls(server: App, jpeg: bytes) -> None:
    before = established_to(server.port)
    async with AsyncClient(target_of(server), connections=3) as client:
        answers = [await client.classify(jpeg) for _ in range(6)]  # in turn: each connection gets two
        assert len(established_to(server.port) - before) == 3
    assert len({a.top.index for a in answers}) == 1
    with pytest.raises(ValueError, match="connections"):
        Client(target_of(server), connections=0)


async def test_an_async_client_opens_in_its_first_calls_loop_and_refuses_another(server: App) -> None:
    """Made with no event loop running (at import time, as web backends make their clients), it
    works in the loop of its first call; a call from another loop is refused in words."""
    client = await asyncio.to_thread(AsyncClient, f"127.0.0.1:{server.port}")
    try:
        assert await client.health() == "SERVING"
        with pytest.raises(RuntimeError, match="belong to the event loop of its first call.*lifespan"):
            await asyncio.to_thread(asyncio.run, client.health())
        assert [m.name for m in await client.list_models()] == ["int8"]
    finally:
        await client.close()
