"""Shrinking an image before it is sent, so a large photo never crosses the network at full size.

Both ways give what the server's exact pipeline gives for the original file, bit for bit (for
8-bit images; the tests check every sample image):

- "resize": decode, then the card's resize (shorter side to 256, Pillow bilinear, sizes
  `round(w * 256 / min(w, h))`), sent as uint8 [H, W, 3]. The server's own resize then keeps the
  size, so it only crops the centre 224.
- "crop": the card's whole preprocessing here (resize, centre crop 224, normalise), sent as the
  model's input, float32 [3, 224, 224], which the server uses as it is.

A uint8 [224, 224, 3] crop would not do: the server takes any uint8 tensor for a photo and
applies the card's resize to it (224 to 256, a zoom of 8/7), so the answer would differ.

Decoding and resizing use Pillow (13 or later, whose resize the server replays exactly); the thin
client install does not have it, so it is imported only when an image is shrunk.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from mobiserve.client._errors import InvalidImage

if TYPE_CHECKING:
    from mobiserve.client._images import ImageLike

SHRINK = ("resize", "crop")
RESIZE_SHORTER, CROP = 256, 224
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# the server's normalisation table, with its float32 arithmetic: (x / 255 - mean) / std
_LUT = np.stack([(np.arange(256, dtype=np.float32) / np.float32(255) - _MEAN[c]) / _STD[c] for c in range(3)])


def check(how: str | None) -> None:
    if how is not None and how not in SHRINK:
        raise ValueError(f"shrink must be None, {' or '.join(repr(s) for s in SHRINK)}; got {how!r}")


def shrunk(image: ImageLike, how: str) -> np.ndarray | None:
    """What to send instead of `image` (uint8 [H, W, 3] or float32 [3, 224, 224]); None to send it
    as it is: a model input already, or with "resize" an image no larger than the result."""
    check(how)
    if isinstance(image, np.ndarray) and image.dtype == np.float32:
        return None  # the model's input already
    pil = _pillow()
    picture = _picture(image, pil)
    width, height = picture.size
    if how == "resize" and min(width, height) <= RESIZE_SHORTER:
        return None
    scale = RESIZE_SHORTER / min(width, height)
    size = (round(width * scale), round(height * scale))
    if size != picture.size:
        picture = picture.resize(size, pil.Resampling.BILINEAR)
    pixels = np.asarray(picture)
    if how == "resize":
        return pixels
    left, top = (size[0] - CROP) // 2, (size[1] - CROP) // 2
    crop = pixels[top : top + CROP, left : left + CROP]
    tensor = np.empty((3, CROP, CROP), np.float32)
    for c in range(3):
        np.take(_LUT[c], crop[:, :, c], out=tensor[c])
    return tensor


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("shrinking images needs Pillow: pip install 'pillow>=13'") from None
    return Image


def _picture(image: ImageLike, pil: Any) -> Any:
    """`image` as an RGB PIL image, converted as the server converts (`convert("RGB")`)."""
    if isinstance(image, (str, os.PathLike)):
        image = Path(image).read_bytes()
    if isinstance(image, np.ndarray):
        return pil.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB")
    if (module := sys.modules.get("PIL.Image")) is not None and isinstance(image, module.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"cannot classify a value of type {type(image).__name__}: pass a path, bytes, a PIL image or a numpy array"
        )
    try:
        picture = pil.open(io.BytesIO(bytes(image)))
        picture.load()
        return picture if picture.mode == "RGB" else picture.convert("RGB")
    except (pil.UnidentifiedImageError, pil.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(grpc.StatusCode.INVALID_ARGUMENT, f"cannot decode the image to shrink it: {exc}") from None
