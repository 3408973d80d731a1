"""The Classifier contract over real gRPC: unary, multi-image, tensors, stream, ListModels, load."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from mobiserve.server.app import App
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import card_pipeline, request_of


def top(response: pb.ClassifyResponse, i: int = 0) -> list[int]:
    return [c.index for c in response.results[i].classes]


async def test_unary_single_image(stub: pb_grpc.ClassifierStub, jpeg: bytes, server: App) -> None:
    r = await stub.Classify(request_of(jpeg, request_id="abc"), timeout=30)
    assert r.request_id == "abc"
    assert r.model == "int8"
    classes = r.results[0].classes
    assert len(classes) == 5  # top_k 0 means 5
    scores = [c.score for c in classes]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    labels = server.served[0].model.labels
    assert all(c.wnid == labels.wnids[c.index] and c.name == labels.names[c.index] for c in classes)
    assert r.timing.batch_size >= 1 and r.timing.preprocess_us > 0 and r.timing.inference_us > 0


async def test_multi_image_results_follow_request_order(
    stub: pb_grpc.ClassifierStub, sample_images: list[Path]
) -> None:
    images = [p.read_bytes() for p in sample_images[:6]]
    together = await stub.Classify(request_of(*images, top_k=3), timeout=60)
    alone = [await stub.Classify(request_of(b, top_k=3), timeout=30) for b in images]
    assert [top(together, i) for i in range(6)] == [top(a) for a in alone]


async def test_top_k_all_classes(stub: pb_grpc.ClassifierStub, jpeg: bytes) -> None:
    r = await stub.Classify(request_of(jpeg, top_k=1000), timeout=30)
    assert sorted(top(r)) == list(range(1000))
    assert abs(sum(c.score for c in r.results[0].classes) - 1) < 1e-3


async def test_tensor_inputs_match_the_encoded_image(stub: pb_grpc.ClassifierStub, sample_images: list[Path]) -> None:
    data = sample_images[5].read_bytes()
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    model_input = card_pipeline(data)
    request = pb.ClassifyRequest(
        top_k=5,
        images=[
            pb.Image(encoded=data),
            pb.Image(tensor=pb.Tensor(shape=list(pixels.shape), dtype="uint8", data=pixels.tobytes())),
            pb.Image(tensor=pb.Tensor(shape=[3, 224, 224], dtype="float32", data=model_input.astype("<f4").tobytes())),
        ],
    )
    r = await stub.Classify(request, timeout=30)
    assert top(r, 0) == top(r, 1) == top(r, 2)


async def test_stream_answers_every_request_once_with_many_in_flight(
    stub: pb_grpc.ClassifierStub, sample_images: list[Path]
) -> None:
    n = 120

    async def requests() -> AsyncIterator[pb.ClassifyRequest]:
        for i in range(n):
            data = b"not an image" if i == 17 else sample_images[i].read_bytes()
            yield request_of(data, request_id=f"r{i}")

    seen: dict[str, pb.ClassifyResponse] = {}
    async for response in stub.ClassifyStream(requests(), timeout=120):
        assert response.request_id not in seen
        seen[response.request_id] = response
    assert set(seen) == {f"r{i}" for i in range(n)}
    assert seen["r17"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "image 0" in seen["r17"].error.message
    assert all(len(r.results) == 1 and not r.HasField("error") for k, r in seen.items() if k != "r17")
    assert max(r.timing.batch_size for r in seen.values()) > 1  # pipelined requests batched together


async def test_list_models(stub: pb_grpc.ClassifierStub) -> None:
    models = (await stub.ListModels(pb.ListModelsRequest(), timeout=10)).models
    assert len(models) == 1
    m = models[0]
    assert (m.name, m.is_default, m.input_name, m.output_name) == ("int8", True, "input", "output")
    assert list(m.input_shape) == [-1, 3, 224, 224] and m.input_dtype == "float32"
    assert m.num_classes == 1000 and m.max_batch_size == 32 and m.instances >= 1 and m.intra_op_threads >= 1
    assert "256" in m.preprocessing and "224" in m.preprocessing


async def test_64_concurrent_clients_are_all_answered_in_batches(server: App, sample_images: list[Path]) -> None:
    target = f"127.0.0.1:{server.port}"
    images = [p.read_bytes() for p in sample_images[:64]]

    async def client(data: bytes) -> pb.ClassifyResponse:
        async with grpc.aio.insecure_channel(target) as ch:  # one connection per client
            response: pb.ClassifyResponse = await pb_grpc.ClassifierStub(ch).Classify(request_of(data), timeout=60)
            return response

    responses = await asyncio.gather(*(client(b) for b in images))
    assert len(responses) == 64 and all(len(r.results[0].classes) == 5 for r in responses)
    assert max(r.timing.batch_size for r in responses) > 1
