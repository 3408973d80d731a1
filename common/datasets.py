"""Labelled image folders: `<label>_<anything>.<ext>` files, or ImageNet-style `<label>/` folders.

`mobiserve validate` (client), `evaluate` and `quantize` (server) and the harness read the same
folders, so the convention lives here once.
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class Labelled:
    path: Path
    label: str


@dataclass
class Found:
    images: list[Labelled] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # image files with no (known) label


def image_files(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


WNID = re.compile(r"n\d{8}")  # an ImageNet (WordNet) id: what a label is when no list of labels is given


def labelled_images(root: Path, known: Container[str] | None = None) -> Found:
    """The labelled image files under `root`, in sorted order. Only image suffixes count; other
    files are ignored. A label is one of `known`, or without it a wnid (`n` and 8 digits): a
    `bench1/` folder or an `ok_big.png` is skipped (and reported), not scored as a wrong answer."""
    found = Found()
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        relative = path.relative_to(root)
        if len(relative.parts) > 1:
            label = relative.parts[0]
        else:
            label, underscore, _ = path.name.partition("_")
            label = label if underscore else ""
        if label and (WNID.fullmatch(label) if known is None else label in known):
            found.images.append(Labelled(path, label))
        else:
            found.skipped.append(path)
    return found
