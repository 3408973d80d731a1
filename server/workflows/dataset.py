"""Image folders for the offline workflows: which files are images, and which class each shows.

The folder layout is the one `mobiserve validate` reads (`mobiserve.common.datasets`):
`<wnid>_anything.JPEG` files, or ImageNet-style `<wnid>/` folders; so `validate` (through a
server) and `evaluate` (in-process) accept exactly the same folders. Here the wnids become the
model's output indices, and only wnids the synsets file lists count as labels.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from mobiserve.common.datasets import labelled_images as find_labelled
from mobiserve.common.labels import Labels


class DatasetError(ValueError):
    """A folder that cannot be used; the message says what was expected."""


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: int  # index into the model's outputs; -1: unknown (counts for agreement between models only)


@dataclass(frozen=True)
class ImageFolder:
    files: list[Path]  # every image file, sorted
    labelled: dict[Path, int]  # the files with a known class


def scan(folder: str | Path, labels: Labels) -> ImageFolder:
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")
    found = find_labelled(root, set(labels.wnids))
    index = labels.index_of()
    return ImageFolder(
        sorted([image.path for image in found.images] + found.skipped),
        {image.path: index[image.label] for image in found.images},
    )


def labelled(images: ImageFolder, paths: list[Path] | None = None) -> list[LabelledImage]:
    """The labelled ones among `paths` (default: all files), in order."""
    return [
        LabelledImage(p, images.labelled[p]) for p in (images.files if paths is None else paths) if p in images.labelled
    ]


def every_image(images: ImageFolder, paths: list[Path]) -> list[LabelledImage]:
    """All of `paths`, labelled or not (-1), in order: what models can be compared on."""
    return [LabelledImage(p, images.labelled.get(p, -1)) for p in paths]


def labelled_images(folder: str | Path, labels: Labels) -> list[LabelledImage]:
    """The labelled images of a folder; an error when there are none."""
    images = scan(folder, labels)
    if not images.labelled:
        raise DatasetError(
            f"no labelled images in {folder} ({len(images.files)} image files): name them <wnid>_*.JPEG "
            f"or put them in <wnid>/ folders, with wnids from the synsets file"
        )
    return labelled(images)


def same_files(chosen: list[Path], others: list[Path]) -> set[Path]:
    """The files of `others` that are one of `chosen`: the same file, or the same bytes elsewhere.
    Only files of a size some chosen file has are read."""
    by_size: dict[int, list[Path]] = {}
    for path in chosen:
        by_size.setdefault(path.stat().st_size, []).append(path)
    if not by_size:
        return set()
    resolved = {p.resolve() for p in chosen}
    digests: dict[Path, str] = {}

    def digest(path: Path) -> str:
        if path not in digests:
            digests[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        return digests[path]

    same = set()
    for path in others:
        if path.resolve() in resolved:
            same.add(path)
        elif candidates := by_size.get(path.stat().st_size):
            if any(digest(path) == digest(c) for c in candidates):
                same.add(path)
    return same


def spread(count: int, total: int) -> list[int]:
    """`count` indices spread evenly over range(total): a class-balanced pick from a sorted folder."""
    if count >= total:
        return list(range(total))
    return [round(i * (total - 1) / max(count - 1, 1)) for i in range(count)]
