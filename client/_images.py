"""What `classify` accepts, turned into the proto's `Image`.

Files and bytes go as they are (the server decodes them exactly as the model card does); a
PIL image or a uint8 array goes as raw RGB pixels, so nothing is lost to re-encoding; a float32
array is taken as the model's input itself. The server validates shapes and dtypes and says
what is wrong, so the client does not repeat those checks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from mobiserve.v1 import classifier_pb2 as pb

if TYPE_CHECKING:
    from PIL import Image as PILImage

ImageLike = Union[str, "os.PathLike[str]", bytes, "PILImage.Image", np.ndarray]
"""A path, encoded image bytes, a PIL image, or an array (uint8 [H, W, 3] RGB or float32 [3, 224, 224])."""


def image_of(image: ImageLike, shrink: str | None = None) -> pb.Image:
    """Blocking for paths (reads the file) and PIL images (decodes them). `shrink` ("resize" or
    "crop", see `_shrink`): send the image scaled down, as the server would scale it."""
    if shrink is not None:
        from mobiserve.client._shrink import shrunk

        pixels = shrunk(image, shrink)
        if pixels is not None:
            return pb.Image(tensor=_tensor(pixels))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.Image(encoded=bytes(image))
    if isinstance(image, (str, os.PathLike)):
        return pb.Image(encoded=Path(image).read_bytes())
    if isinstance(image, np.ndarray):
        return pb.Image(tensor=_tensor(image))
    pil = sys.modules.get("PIL.Image")  # Pillow is optional: a PIL image means it is imported already
    if pil is not None and isinstance(image, pil.Image):
        return pb.Image(tensor=_tensor(np.asarray(image if image.mode == "RGB" else image.convert("RGB"))))
    raise TypeError(
        f"cannot classify a value of type {type(image).__name__}: pass a path, bytes, a PIL image or a numpy array"
    )


def is_cheap(image: ImageLike, shrink: str | None = None) -> bool:
    """True when converting needs no I/O or decoding, so an event loop may do it inline."""
    return shrink is None and isinstance(image, (bytes, bytearray, memoryview, np.ndarray))


def _tensor(array: np.ndarray) -> pb.Tensor:
    """Little-endian, C order, as the proto requires."""
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return pb.Tensor(shape=list(array.shape), dtype=array.dtype.name, data=array.tobytes())
