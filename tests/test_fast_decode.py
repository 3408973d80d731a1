"""The opt-in fast decode: large JPEGs decoded scaled down in the DCT domain, the rest untouched.

What it must keep: ImageNet-sized images give the exact path's bits; a large JPEG comes out at
the smallest power-of-two scale whose shorter side is still >= 256; the limits (max_pixels, a
corrupt stream) refuse the same images; a server with `decode = "fast"` says so and serves it.
How close the answers stay on real photos is a measurement (docs/performance.md), not a test.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from mobiserve.common.labels import Labels
from mobiserve.server.config import ModelConfig, load_toml
from mobiserve.server.processing.preprocess import (
    ImageLimits,
    InvalidImage,
    dct_scale,
    decode,
    preprocess_encoded,
)
from mobiserve.server.runtime.model import Model
from mobiserve.server.runtime.session import SessionTuning
from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import SYNSETS, encode, model_config, request_of, run, start_server

LIMITS = ImageLimits()


def photo(source: Path, width: int, height: int, mode: str = "RGB") -> bytes:
    """A sample image upscaled to a phone photo's size, as a quality-90 JPEG."""
    image = Image.open(source).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    return encode(image.convert(mode), "JPEG", quality=90)


@pytest.fixture(scope="module")
def large(sample_images: list[Path]) -> bytes:
    return photo(sample_images[3], 2400, 1800)


def test_imagenet_sized_images_decode_exactly(sample_images: list[Path]) -> None:
    small = 0
    for path in sample_images[::7]:
        data = path.read_bytes()
        width, height = Image.open(io.BytesIO(data)).size
        if min(width, height) > 510:
            continue
        small += 1
        assert np.array_equal(preprocess_encoded(data, LIMITS, "fast"), preprocess_encoded(data, LIMITS)), path.name
    assert small > 50


@pytest.mark.parametrize(
    ("size", "eighths"),
    [((4000, 3000), 1), ((3000, 4000), 1), ((2048, 2047), 1), ((2309, 1732), 2), ((1155, 866), 4), ((600, 511), 4)],
)
def test_the_smallest_power_of_two_scale_keeping_256(size: tuple[int, int], eighths: int) -> None:
    assert dct_scale(*size) == eighths
    shorter = -(-min(size) * eighths // 8)
    assert 256 <= shorter and (eighths == 1 or -(-min(size) * eighths // 16) < 256)


def test_images_under_512_keep_their_size() -> None:
    for size in [(500, 375), (640, 510), (300, 4000), (100, 100)]:
        assert dct_scale(*size) == 8


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_large_jpegs_come_out_scaled_and_close_to_exact(sample_images: list[Path], mode: str) -> None:
    """Every colour space: YCbCr and grey through simplejpeg, CMYK through Pillow's draft."""
    data = photo(sample_images[8], 2400, 1800, mode)
    pixels = decode(data, LIMITS, "fast")
    assert pixels.shape == (450, 600, 3)  # 1/4: 1/8 would make the shorter side 225
    fast, exact = preprocess_encoded(data, LIMITS, "fast"), preprocess_encoded(data, LIMITS)
    assert fast.shape == exact.shape == (224, 224, 3)
    difference = np.abs(fast.astype(int) - exact.astype(int))
    assert difference.mean() < 3, difference.mean()  # the same picture; not the same bits


def test_the_limits_still_hold(large: bytes) -> None:
    with pytest.raises(InvalidImage, match="megapixels"):
        decode(large, ImageLimits(max_pixels=4_000_000), "fast")
    truncated = large[: len(large) // 2]
    with pytest.raises(InvalidImage, match="corrupt or truncated"):
        decode(truncated, LIMITS, "fast")
    cmyk = encode(Image.new("CMYK", (1200, 1000), (10, 20, 30, 0)), "JPEG")
    with pytest.raises(InvalidImage, match="corrupt or truncated"):
        decode(cmyk[: len(cmyk) // 2], LIMITS, "fast")


def test_decode_is_a_model_setting(tmp_path: Path) -> None:
    config = tmp_path / "mobiserve.toml"
    config.write_text('[[models]]\nname = "photos"\npath = "m.onnx"\ndecode = "fast"\n')
    assert load_toml(config).models[0].decode == "fast"
    assert ModelConfig(name="a", path="m.onnx").decode == "exact"
    with pytest.raises(ValueError, match="decode must be one of exact, fast"):
        ModelConfig(name="a", path="m.onnx", decode="quick")  # type: ignore[arg-type]


async def test_a_fast_decode_server_serves_large_photos(int8_model: Path, large: bytes, jpeg: bytes) -> None:
    app = await start_server(model_config(int8_model, name="photos", decode="fast"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb_grpc.ClassifierStub(channel)
            listed = await stub.ListModels(pb.ListModelsRequest(), timeout=30)
            assert "fast decode" in listed.models[0].preprocessing
            reply = await stub.Classify(request_of(large, jpeg), timeout=60)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Classify(request_of(large[: len(large) // 2]), timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "corrupt or truncated JPEG" in (refused.value.details() or "")
            again = await stub.Classify(request_of(jpeg), timeout=60)  # and it goes on serving
    finally:
        await app.stop(grace_s=5)
    model = Model(int8_model, Labels.load(SYNSETS), SessionTuning(intra_op_threads=2))
    expected = model.infer([preprocess_encoded(d, LIMITS, "fast") for d in (large, jpeg)]).order[:, 0]
    assert [r.classes[0].index for r in reply.results] == expected.tolist()
    assert again.results[0].classes[0].index == expected[1]


@pytest.mark.slow
def test_evaluate_decodes_as_the_server_does(tmp_path: Path, int8_model: Path, sample_images: list[Path]) -> None:
    chosen = sample_images[100:104]
    for path in chosen:
        (tmp_path / path.name).write_bytes(photo(path, 1600, 1200))
    done = run(
        "evaluate",
        str(int8_model),
        "--images",
        str(tmp_path),
        "--synsets",
        str(SYNSETS),
        "--decode",
        "fast",
        "--rounds",
        "0",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    labels = Labels.load(SYNSETS)
    model = Model(int8_model, labels, SessionTuning(intra_op_threads=2))
    crops = [preprocess_encoded((tmp_path / p.name).read_bytes(), LIMITS, "fast") for p in chosen]
    truth = [labels.wnids.index(p.name.split("_")[0]) for p in chosen]
    correct = int((model.infer(crops).order[:, 0] == truth).sum())
    assert result["decode"] == "fast" and result["count"] == len(chosen)
    assert result["top1"] == correct / len(chosen)


def test_serve_takes_decode_from_the_config_file_not_the_flag(tmp_path: Path) -> None:
    config = tmp_path / "mobiserve.toml"
    config.write_text('[[models]]\nname = "photos"\npath = "m.onnx"\n')
    done = run("serve", "--config", str(config), "--decode", "fast")
    assert done.returncode != 0
    line = done.stderr.strip().splitlines()[-1]
    assert "--decode" in line and "[[models]]" in line
