"""The model card's preprocessing, made cheap without changing a single output bit.

Card: decode to RGB, resize the shorter side to 256 (Pillow bilinear, sizes round(w*256/min(w,h))),
centre-crop 224 (offsets (W-224)//2), scale to [0, 1], normalise by the ImageNet mean/std, NCHW.

The int8 model flips its top-1 on a few percent of images when pixels move by one level, so every
shortcut here is bit-exact with the card's Pillow pipeline:
- JPEG is decoded by libjpeg-turbo through simplejpeg (same pixels as Pillow, and faster);
- only the 224x224 crop is resampled (`resize.center_crop_resize`, Pillow's arithmetic replicated);
- images stay uint8 until a whole batch is normalised at once through a lookup table (`normalize`).
Everything runs in a worker thread: simplejpeg, Pillow and numpy release the GIL.

`decode="fast"` (opt-in, per model) gives up exactness for large JPEGs: libjpeg-turbo decodes them
at 1/2, 1/4 or 1/8 scale in the DCT domain, the smallest of these that keeps the shorter side at
least 256, and the card's resize and crop run from there: a phone photo then costs several times
less (docs/performance.md#large-photos). An image whose shorter side is at most 510 is decoded at
full size as before, so ImageNet-sized images give the same bits either way. Only power-of-two
scales: libjpeg-turbo has SIMD kernels for those, and its 3/8..7/8 kernels were no faster than the
next power of two here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from mobiserve.server.errors import InvalidInput, shown
from mobiserve.server.processing.resize import center_crop_resize

INPUT_SIZE = 224
RESIZE_SHORTER = 256
PREPROCESSING = (
    "decode to RGB; shorter side to 256 (Pillow bilinear); centre crop 224; /255; "
    "normalise mean (0.485, 0.456, 0.406) std (0.229, 0.224, 0.225); NCHW float32"
)
FAST_DECODE = "JPEG decoded at 1/2, 1/4 or 1/8 scale when the shorter side stays >= 256 (fast decode); then "

# Pillow opens these lazily and can tell their size from the header alone.
_PILLOW_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO")


class InvalidImage(InvalidInput):
    """The bytes or tensor cannot be turned into a model input; the message says why."""


@dataclass(frozen=True)
class ImageLimits:
    """Refusals that protect the server: checked from the header, before a full decode."""

    max_pixels: int = 50_000_000
    min_side: int = 8


def preprocessing(mode: str) -> str:
    """What a model's preprocessing is, in words (ListModels)."""
    return FAST_DECODE + PREPROCESSING if mode == "fast" else PREPROCESSING


def decode(data: bytes, limits: ImageLimits, mode: str = "exact") -> np.ndarray:
    """Encoded image bytes -> uint8 RGB pixels [H, W, 3]; with mode "fast", large JPEGs come out
    scaled down (`dct_scale`)."""
    if not data:
        raise InvalidImage("empty image bytes")
    fast = mode == "fast"
    if data[:2] == b"\xff\xd8":
        pixels = _decode_jpeg(data, limits, fast)
        if pixels is not None:
            return pixels
    return _decode_pillow(data, limits, fast)


def dct_scale(width: int, height: int) -> int:
    """The fast path's JPEG scale in eighths: 1, 2 or 4 when the scaled shorter side (libjpeg
    rounds up) is still at least 256, else 8 (full size)."""
    shorter = min(width, height)
    return next((e for e in (1, 2, 4) if -(-shorter * e // 8) >= RESIZE_SHORTER), 8)


def _check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise InvalidImage(
            f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels, over the "
            f"limit of {limits.max_pixels / 1e6:.1f} (refused before decoding)"
        )
    if min(width, height) < limits.min_side:
        raise InvalidImage(f"image is {width}x{height}; both sides must be at least {limits.min_side} pixels")


def _decode_jpeg(data: bytes, limits: ImageLimits, fast: bool) -> np.ndarray | None:
    """libjpeg-turbo fast path for YCbCr and grey JPEGs (verified bit-identical to Pillow);
    None hands the rest (CMYK/YCCK, whose conversion differs by a level, odd markers) to Pillow."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray"):
        return None
    _check_size(width, height, limits)
    eighths = dct_scale(width, height) if fast else 8
    try:
        # strict: a truncated or corrupt stream is an error, not a grey-padded image. simplejpeg
        # takes the smallest scale whose size is at least the minimum: exactly `eighths` here
        pixels: np.ndarray = simplejpeg.decode_jpeg(
            data,
            colorspace="RGB",
            strict=True,
            min_width=-(-width * eighths // 8),
            min_height=-(-height * eighths // 8),
        )
        return pixels
    except ValueError as exc:
        raise InvalidImage(f"corrupt or truncated JPEG: {exc}") from None


def _decode_pillow(data: bytes, limits: ImageLimits, fast: bool) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # Pillow's own, looser limit, hit in the header
        raise InvalidImage(
            f"image is over the limit of {limits.max_pixels / 1e6:.1f} megapixels (refused before decoding): {exc}"
        ) from None
    except UnidentifiedImageError:
        raise InvalidImage("not a decodable image (supported: JPEG, PNG, WebP, BMP, GIF, TIFF)") from None
    except Exception as exc:  # Pillow raises many types for malformed headers
        raise InvalidImage(f"unreadable image header: {exc}") from None
    if image.format not in _PILLOW_FORMATS:
        raise InvalidImage(f"unsupported image format {image.format}")
    _check_size(*image.size, limits)
    if fast and image.format in ("JPEG", "MPO") and (eighths := dct_scale(*image.size)) < 8:
        # CMYK and the JPEGs simplejpeg declines: Pillow takes the largest scale that this size
        # divides into the image at least `8 / eighths` times
        image.draft(image.mode, (image.width * eighths // 8, image.height * eighths // 8))
    try:
        image.load()  # first frame of an animation / multi-page file
        return np.asarray(_to_rgb(image))
    except Exception as exc:
        raise InvalidImage(f"corrupt or truncated {image.format}: {exc}") from None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB, as the card's `convert("RGB")`, but 16/32-bit greys keep their range."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide: np.ndarray = np.asarray(image, dtype=np.uint32 if image.mode == "I" else np.uint16)
        image = Image.fromarray((wide >> 8).clip(0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.nan_to_num(np.asarray(image)).clip(0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def crop(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB pixels [H, W, 3] -> the card's uint8 crop [224, 224, 3]."""
    return center_crop_resize(pixels, shorter=RESIZE_SHORTER, size=INPUT_SIZE)


def preprocess_encoded(data: bytes, limits: ImageLimits, mode: str = "exact") -> np.ndarray:
    return crop(decode(data, limits, mode))


def preprocess_tensor(shape: tuple[int, ...], dtype: str, data: bytes, limits: ImageLimits) -> np.ndarray:
    """A raw tensor -> uint8 crop [224, 224, 3] or float32 model input [3, 224, 224]."""
    if dtype == "uint8":
        if len(shape) != 3 or shape[2] != 3:
            raise InvalidImage(f"uint8 tensor must have shape [H, W, 3], got {shown(shape)}")
        _check_size(shape[1], shape[0], limits)
        expected = shape[0] * shape[1] * 3
        if len(data) != expected:
            raise InvalidImage(f"uint8 tensor of shape {shown(shape)} needs {expected} bytes, got {len(data)}")
        return crop(np.frombuffer(data, dtype=np.uint8).reshape(shape))
    if dtype == "float32":
        want = [3, INPUT_SIZE, INPUT_SIZE]
        if list(shape) != want:
            raise InvalidImage(f"float32 tensor must have shape {want}, got {shown(shape)}")
        expected = 3 * INPUT_SIZE * INPUT_SIZE * 4
        if len(data) != expected:
            raise InvalidImage(f"float32 tensor of shape {want} needs {expected} bytes, got {len(data)}")
        tensor = np.frombuffer(data, dtype="<f4").reshape(want)
        if not np.isfinite(tensor).all():
            raise InvalidImage("float32 tensor contains NaN or infinity")
        return tensor
    raise InvalidImage(f"tensor dtype must be 'uint8' or 'float32', got {shown(dtype)}")
