"""Preprocessing: bit-exact with the card's Pillow pipeline, every format and mode, clean refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobiserve.server.processing.normalize import assemble
from mobiserve.server.processing.preprocess import ImageLimits, InvalidImage, decode, preprocess_encoded

from helpers import card_pipeline, encode

LIMITS = ImageLimits()


@pytest.mark.slow
def test_bit_exact_with_the_card_pipeline_on_every_sample_image(sample_images: list[Path]) -> None:
    for path in sample_images:
        ours = assemble([preprocess_encoded(path.read_bytes(), LIMITS)])[0]
        assert np.array_equal(ours, card_pipeline(path)), path.name


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "GIF", "TIFF", "JPEG"])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK"])
def test_every_format_and_mode_decodes_like_pillow(fmt: str, mode: str) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)).convert(mode)
    if (fmt, mode) in {
        ("BMP", "CMYK"),
        ("GIF", "CMYK"),
        ("WEBP", "CMYK"),
        ("PNG", "CMYK"),
        ("JPEG", "RGBA"),
        ("JPEG", "P"),
    }:
        pytest.skip(f"Pillow cannot write {mode} as {fmt}")
    data = encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    pixels = decode(data, LIMITS)
    assert pixels.dtype == np.uint8 and pixels.shape == (61, 83, 3)
    assert np.array_equal(pixels, np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB")))


def test_16_bit_greyscale_keeps_its_range() -> None:
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")  # mode I;16
    pixels = decode(data, LIMITS)
    assert pixels.shape == (64, 64, 3)
    assert np.array_equal(pixels[..., 0], (ramp >> 8).astype(np.uint8))  # scaled, not clipped to white


def test_bomb_is_refused_from_its_header() -> None:
    # a JPEG header claiming 20000 x 20000 and nothing behind it: refused before any decoding
    image = Image.new("RGB", (16, 16))
    data = bytearray(encode(image, "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (20000).to_bytes(2, "big") * 2
    with pytest.raises(InvalidImage, match="megapixels"):
        decode(bytes(data), LIMITS)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"GIF89a" + b"\0" * 10, "image"),
        (b"%PDF-1.4 not an image", "not a decodable image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "JPEG"),
    ],
)
def test_junk_gets_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidImage, match=reason):
        decode(data, LIMITS)


def test_tiny_images_are_refused() -> None:
    with pytest.raises(InvalidImage, match="at least 8 pixels"):
        decode(encode(Image.new("RGB", (1, 1)), "PNG"), LIMITS)
