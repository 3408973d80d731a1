"""The client's `shrink`: a photo scaled down before it is sent gets the answer the server's exact
pipeline gives for the original, bit for bit; a uint8 224x224 crop would not (the server rescales
any uint8 tensor), which is why "crop" sends the model input itself."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_client_cli import run

from mobiserve.client import AsyncClient, Client, InvalidImage
from mobiserve.client._images import image_of
from mobiserve.client._shrink import shrunk
from mobiserve.server.app import App
from mobiserve.server.processing.normalize import assemble
from mobiserve.server.processing.preprocess import ImageLimits, preprocess_encoded, preprocess_tensor

from helpers import encode

LIMITS = ImageLimits()


def server_input(data: bytes | None, tensor: np.ndarray | None) -> np.ndarray:
    """The model input the server builds from what the client sends."""
    if tensor is None:
        assert data is not None
        item = preprocess_encoded(data, LIMITS)
    elif tensor.dtype == np.float32:
        return tensor
    else:
        item = preprocess_tensor(tensor.shape, "uint8", tensor.tobytes(), LIMITS)
    model_input: np.ndarray = assemble([item])[0]
    return model_input


def sent(path: Path, how: str) -> np.ndarray:
    """The server's model input for what `shrink=how` sends in place of `path`."""
    image = image_of(path, how)
    if image.HasField("tensor"):
        t = image.tensor
        return server_input(None, np.frombuffer(t.data, dtype=t.dtype).reshape(tuple(t.shape)))
    return server_input(image.encoded, None)


@pytest.fixture(scope="module")
def big_photo(tmp_path_factory: pytest.TempPathFactory, sample_images: list[Path]) -> Path:
    path = tmp_path_factory.mktemp("photos") / "n01440764_large.JPEG"
    picture = Image.open(sample_images[0]).convert("RGB").resize((2400, 1800), Image.Resampling.BICUBIC)
    path.write_bytes(encode(picture, "JPEG", quality=90))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("how", ["resize", "crop"])
def test_shrinking_gives_the_exact_pipeline_on_every_sample_image(sample_images: list[Path], how: str) -> None:
    for path in sample_images:
        assert np.array_equal(sent(path, how), server_input(path.read_bytes(), None)), path.name


@pytest.mark.parametrize("how", ["resize", "crop"])
def test_shrinking_a_large_photo_gives_the_exact_pipeline(big_photo: Path, how: str) -> None:
    assert image_of(big_photo, how).HasField("tensor")
    assert np.array_equal(sent(big_photo, how), server_input(big_photo.read_bytes(), None))


def test_resize_sends_a_256_shorter_side_and_small_images_as_they_are(
    big_photo: Path, sample_images: list[Path]
) -> None:
    tensor = image_of(big_photo, "resize").tensor
    assert list(tensor.shape) == [256, 341, 3] and tensor.dtype == "uint8"
    assert len(tensor.data) < big_photo.stat().st_size
    assert list(image_of(big_photo, "crop").tensor.shape) == [3, 224, 224]
    small = next(p for p in sample_images if min(Image.open(p).size) <= 256)
    assert image_of(small, "resize").encoded == small.read_bytes()


def test_a_uint8_224_crop_would_not_be_the_same(big_photo: Path) -> None:
    """Why "crop" sends float32: sent as uint8, the server takes the crop for a photo and resizes it."""
    crop = preprocess_encoded(big_photo.read_bytes(), LIMITS)
    assert not np.array_equal(server_input(None, crop), server_input(big_photo.read_bytes(), None))


def test_bad_shrink_requests_are_refused_before_sending(big_photo: Path) -> None:
    with pytest.raises(ValueError, match="shrink must be"):
        Client("127.0.0.1:1").classify(big_photo, shrink="small")
    with pytest.raises(InvalidImage, match="cannot decode the image to shrink it"):
        shrunk(b"not an image at all", "resize")
    with pytest.raises(InvalidImage, match="cannot decode"):
        shrunk(big_photo.read_bytes()[:5000], "crop")


async def test_both_clients_get_the_same_answer_shrunk_or_not(server: App, big_photo: Path) -> None:
    target = f"127.0.0.1:{server.port}"
    async with AsyncClient(target) as client:
        full = await client.classify(big_photo, top_k=5)
        shrunk_async = [await client.classify(big_photo, top_k=5, shrink=how) for how in ("resize", "crop")]
        streamed = [r async for r in client.classify_many([big_photo, big_photo], top_k=5, shrink="resize")]

    def blocking() -> list[object]:
        with Client(target) as c:
            return [c.classify(big_photo, top_k=5, shrink="crop"), *c.classify_many([big_photo], shrink="resize")]

    for result in [*shrunk_async, *streamed, *await asyncio.to_thread(blocking)]:
        assert result.classes == full.classes  # type: ignore[attr-defined]


async def test_the_classify_command_shrinks(server: App, big_photo: Path) -> None:
    target = f"127.0.0.1:{server.port}"
    async with AsyncClient(target) as client:
        full = await client.classify(big_photo, top_k=3)
    code, out, err = await run(
        "classify", str(big_photo), "--shrink", "crop", "--top-k", "3", "--json", "--target", target
    )
    assert code == 0, err
    answer = json.loads(out)[0]
    assert [c["index"] for c in answer["classes"]] == [c.index for c in full.classes]
    assert [c["score"] for c in answer["classes"]] == [c.score for c in full.classes]
