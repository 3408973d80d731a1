"""Every bad input gets its status and a message a person understands; everyone else is served."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest
from PIL import Image

from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import encode, png_bomb, request_of

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def tensor(shape: list[int], dtype: str, nbytes: int) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(images=[pb.Image(tensor=pb.Tensor(shape=shape, dtype=dtype, data=b"\0" * nbytes))])


def cases(jpeg: bytes) -> dict[str, tuple[pb.ClassifyRequest, grpc.StatusCode, str]]:
    tiny = Image.new("RGB", (1, 1))
    return {
        "empty request": (pb.ClassifyRequest(), INVALID, "no images"),
        "zero images, model named": (pb.ClassifyRequest(model="int8", top_k=3), INVALID, "no images"),
        "image with no data": (pb.ClassifyRequest(images=[pb.Image()]), INVALID, "image 0"),
        "random bytes": (request_of(os.urandom(5000)), INVALID, "not a decodable image"),
        "truncated jpeg": (request_of(jpeg[: len(jpeg) // 3]), INVALID, "JPEG"),
        "unsupported format": (
            request_of(encode(Image.new("RGB", (32, 32)), "PPM")),
            INVALID,
            "unsupported image format",
        ),
        "decompression bomb": (request_of(png_bomb()), INVALID, "megapixels"),
        "1x1 image": (request_of(encode(tiny, "PNG")), INVALID, "at least"),
        "tensor wrong shape": (tensor([3, 10, 10], "float32", 1200), INVALID, "shape"),
        "tensor wrong dtype": (tensor([3, 224, 224], "float64", 3 * 224 * 224 * 8), INVALID, "dtype"),
        "tensor wrong byte count": (tensor([100, 100, 3], "uint8", 29999), INVALID, "bytes"),
        "top_k over 1000": (request_of(jpeg, top_k=1001), INVALID, "top_k"),
        "unknown model": (request_of(jpeg, model="no-such-model"), grpc.StatusCode.NOT_FOUND, "no-such-model"),
        "second image bad": (request_of(jpeg, b"junk"), INVALID, "image 1"),
    }


@pytest.mark.parametrize("name", list(cases(b"\xff\xd8").keys()))
async def test_bad_input_gets_a_clear_status(stub: pb_grpc.ClassifierStub, jpeg: bytes, name: str) -> None:
    request, code, words = cases(jpeg)[name]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Classify(request, timeout=30)
    assert err.value.code() == code, err.value.details()
    assert words in (err.value.details() or ""), err.value.details()
    # and the server still serves
    ok = await stub.Classify(request_of(jpeg), timeout=30)
    assert len(ok.results[0].classes) == 5


async def test_bad_items_never_hurt_their_batch_mates(stub: pb_grpc.ClassifierStub, sample_images: list[Path]) -> None:
    good = [p.read_bytes() for p in sample_images[:40]]
    expected = [(await stub.Classify(request_of(b), timeout=30)).results[0].classes[0].index for b in good]

    async def bad(i: int) -> grpc.StatusCode:
        try:
            await stub.Classify(request_of(os.urandom(3000) if i % 2 else png_bomb()), timeout=30)
        except grpc.aio.AioRpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    async def fine(b: bytes) -> int:
        return int((await stub.Classify(request_of(b), timeout=30)).results[0].classes[0].index)

    results = await asyncio.gather(*(fine(b) for b in good), *(bad(i) for i in range(40)))
    assert results[:40] == expected
    assert set(results[40:]) == {INVALID}
