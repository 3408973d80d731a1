"""Image folders for the offline workflows: which files are images, and which class each shows.

The folder layout is the one `mobiserve validate` reads (`mobiserve.common.datasets`):
`<wnid>_anything.JPEG` files, or ImageNet-style `<wnid>/` folders; so `validate` (through a
server) and `evaluate` (in-process) accept exactly the same folders. Here the wnids become the
model's output indices, and only wnids the synsets file lists count as labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mobiserve.common.datasets import labelled_images as find_labelled
from mobiserve.common.labels import Labels


class DatasetError(ValueError):
    """A folder that cannot be used; the message says what was expected."""


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: int  # index into the model's outputs


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


def labelled_images(folder: str | Path, labels: Labels) -> list[LabelledImage]:
    """The labelled images of a folder; an error when there are none."""
    images = scan(folder, labels)
    if not images.labelled:
        raise DatasetError(
            f"no labelled images in {folder} ({len(images.files)} image files): name them <wnid>_*.JPEG "
            f"or put them in <wnid>/ folders, with wnids from the synsets file"
        )
    return labelled(images)


def spread(count: int, total: int) -> list[int]:
    """`count` indices spread evenly over range(total): a class-balanced pick from a sorted folder."""
    if count >= total:
        return list(range(total))
    return [round(i * (total - 1) / max(count - 1, 1)) for i in range(count)]
