"""Fuzz the decode/preprocess path with random and mutated image bytes (hypothesis, bounded).

The only acceptable outcomes are a (224, 224, 3) uint8 crop or InvalidImage with a message; any
other exception is a crash, and pytest-timeout catches a hang. Over gRPC the same inputs get OK or
INVALID_ARGUMENT, never anything else, and the server keeps serving.

    MOBISERVE_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py   # a longer hunt (default 1000 each)
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mobiserve.server.processing.preprocess import ImageLimits, InvalidImage, preprocess_encoded
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import encode, request_of

EXAMPLES = int(os.environ.get("MOBISERVE_FUZZ_EXAMPLES", "1000"))
# a smaller pixel limit than the server's default keeps each example fast; the code path is the same
LIMITS = ImageLimits(max_pixels=4_000_000)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def seeds() -> list[bytes]:
    """Small valid images in every format and many modes: the mutations start from these."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    out = [
        encode(rgb, "JPEG", quality=80),
        encode(rgb.convert("L"), "JPEG"),
        encode(rgb.convert("CMYK"), "JPEG"),
        encode(rgb, "JPEG", progressive=True),
        encode(rgb, "PNG"),
        encode(rgb.convert("RGBA"), "PNG"),
        encode(rgb.convert("P"), "PNG"),
        encode(rgb.convert("I;16"), "PNG"),
        encode(rgb.convert("1"), "PNG"),
        encode(rgb, "GIF"),
        encode(rgb, "BMP"),
        encode(rgb, "WEBP"),
        encode(rgb, "TIFF"),
        encode(rgb, "TIFF", compression="tiff_deflate"),
        encode(rgb.convert("F"), "TIFF"),
    ]
    return out


SEEDS = seeds()
MAGICS = [s[:8] for s in SEEDS]


def check(data: bytes) -> None:
    try:
        crop = preprocess_encoded(data, LIMITS)
    except InvalidImage as exc:
        assert str(exc), "an InvalidImage must say why"
        return
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(("flip", "overwrite_int", "truncate", "insert", "delete", "duplicate")))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite_int":  # header fields: sizes, counts, offsets
            value = draw(st.sampled_from((0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)))
            data[at : at + 4] = struct.pack(draw(st.sampled_from((">I", "<I"))), value)
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 256))]
    return bytes(data)


@pytest.mark.timeout(300)
@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused_cleanly(data: bytes) -> None:
    check(data)


@pytest.mark.timeout(300)
@FUZZ
@given(st.sampled_from(MAGICS), st.binary(max_size=2048))
def test_random_bytes_behind_a_real_magic_number_are_refused_cleanly(magic: bytes, rest: bytes) -> None:
    check(magic + rest)


@pytest.mark.slow
@pytest.mark.timeout(300)
@FUZZ
@given(mutated())
def test_mutated_images_decode_or_are_refused_cleanly(data: bytes) -> None:
    check(data)


def test_the_seeds_themselves_decode() -> None:
    for data in SEEDS:
        assert preprocess_encoded(data, LIMITS).shape == (224, 224, 3)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_mutated_images_over_grpc_get_ok_or_invalid_argument(
    stub: pb_grpc.ClassifierStub, sample_images: list[Path]
) -> None:
    rng = random.Random(5)
    originals = [*SEEDS, sample_images[0].read_bytes()]

    def mutate(data: bytes) -> bytes:
        out = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(out))
            if rng.random() < 0.5:
                out[at] = rng.randrange(256)
            elif rng.random() < 0.5:
                del out[at:]
            else:
                out[at:at] = rng.randbytes(rng.randint(1, 32))
            if not out:
                out = bytearray(b"\0")
        return bytes(out)

    inputs = [mutate(rng.choice(originals)) for _ in range(200)]

    async def one(data: bytes) -> grpc.StatusCode:
        try:
            response = await stub.Classify(request_of(data), timeout=120)
        except grpc.aio.AioRpcError as e:
            assert e.details(), "a refusal must say why"
            return e.code()
        assert len(response.results[0].classes) == 5
        return grpc.StatusCode.OK

    codes = []
    for start in range(0, len(inputs), 25):  # bounded concurrency
        codes += await asyncio.gather(*(one(d) for d in inputs[start : start + 25]))
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}, set(codes)
    assert grpc.StatusCode.INVALID_ARGUMENT in codes
    assert len((await stub.Classify(request_of(originals[-1]), timeout=60)).results) == 1
