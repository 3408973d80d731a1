"""Which served model, and which of its two faces, an Open Inference Protocol model name means.

Triton serves a network under its own name with the network's one tensor input, and puts image
decoding in a separate model (an ensemble) that takes the encoded bytes; Triton's example
clients, perf_analyzer and the users' own code expect exactly that. So each served model is two
models of the protocol:

- `NAME`: the network. One input, its own (`input`, FP32 [-1, 3, 224, 224], NCHW, already
  preprocessed), one output (`output`, FP32 [-1, classes]).
- `NAME_image`: the same network behind the server's preprocessing. One input, `encoded_image`
  (BYTES [-1, 1], an image file per element: JPEG, PNG, ...), the same output.

Both go to the same batcher. A served model whose own name is `X_image` keeps that name: it
hides the image face of a model `X`, if one is served (say so in the config instead).
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass

IMAGE_SUFFIX = "_image"


@dataclass(frozen=True)
class Face:
    """A protocol model name, resolved: the served model (`""`: the default) and which face."""

    name: str  # the protocol's name, as asked
    model: str  # the served model's name
    image: bool  # True: takes encoded images; False: the network's own input


def face_of(name: str, served: Container[str]) -> Face:
    """What `name` means; an unknown name is passed on as is (the registry answers NOT_FOUND)."""
    base = name.removesuffix(IMAGE_SUFFIX)
    if name not in served and base != name and base in served:
        return Face(name, base, True)
    return Face(name, name, False)


def image_name(model: str) -> str:
    return model + IMAGE_SUFFIX


def every_name(models: Iterable[str]) -> list[Face]:
    """Both faces of every served model (but an image face a served name hides)."""
    served = list(models)
    faces = [(Face(m, m, False), Face(image_name(m), m, True)) for m in served]
    return [face for pair in faces for face in pair if not (face.image and face.name in served)]
