#!/usr/bin/env python3
"""Make the phone-photo-sized test sets: every image of a folder re-encoded at 1, 4 and 12 MP.

    scripts/make-photos.py ../shared/data/imagenet-sample /tmp/mobiserve-photos [--sizes 1,4,12]

writes OUTPUT/1mp/, OUTPUT/4mp/, OUTPUT/12mp/, each holding every image of the source folder under
its own name (so `<wnid>_*.JPEG` labels carry over), scaled to that many megapixels with its aspect
ratio kept (width = round(sqrt(MP * 1e6 * w / h))), Lanczos, then saved as a baseline JPEG at
quality 90 with Pillow's default 4:2:0 chroma subsampling: what a phone's camera app writes.
Grey images stay grey; others become RGB. The same inputs and Pillow give the same bytes, so the
run is reproducible: it prints one sha256 per size over all its files (sorted by name) to check.

The output folder must lie outside the project: images are never committed. These are upscaled
ImageNet images, smoother than real photos, which favours scaled decoding; docs/performance.md
says what that means for the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

QUALITY = 90
SUFFIXES = {".jpeg", ".jpg", ".png", ".webp", ".bmp"}


def photo(source: Path, megapixels: float) -> bytes:
    """`source` scaled to about `megapixels`, aspect kept, as JPEG bytes."""
    with Image.open(source) as image:
        image = image.convert("L" if image.mode in ("L", "I;16", "I") else "RGB")
        width = round(math.sqrt(megapixels * 1e6 * image.width / image.height))
        height = round(width * image.height / image.width)
        scaled = image.resize((width, height), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    scaled.save(out, "JPEG", quality=QUALITY)
    return out.getvalue()


def _write(job: tuple[Path, Path, float]) -> str:
    source, target, megapixels = job
    data = photo(source, megapixels)
    target.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _inside_project(folder: Path) -> bool:
    root = subprocess.run(
        ["git", "-C", str(Path(__file__).parent), "rev-parse", "--show-toplevel"], capture_output=True, text=True
    ).stdout.strip()
    return bool(root) and folder.resolve().is_relative_to(Path(root).resolve())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="folder of images (e.g. ../shared/data/imagenet-sample)")
    parser.add_argument("output", type=Path, help="folder to write <N>mp/ folders into, outside the project")
    parser.add_argument("--sizes", default="1,4,12", help="megapixels, comma-separated (default 1,4,12)")
    parser.add_argument("--jobs", type=int, default=2, help="processes (default 2)")
    args = parser.parse_args()
    if _inside_project(args.output):
        sys.exit(f"{args.output} is inside the project; write the images elsewhere (they must not be committed)")
    sources = sorted(p for p in args.source.iterdir() if p.suffix.lower() in SUFFIXES)
    if not sources:
        sys.exit(f"no images in {args.source}")
    for size in [float(s) for s in args.sizes.split(",")]:
        folder = args.output / f"{size:g}mp"
        folder.mkdir(parents=True, exist_ok=True)
        jobs = [(p, folder / p.with_suffix(".JPEG").name, size) for p in sources]
        with ProcessPoolExecutor(args.jobs) as pool:
            digests = list(pool.map(_write, jobs, chunksize=8))
        total = sum((folder / p.with_suffix(".JPEG").name).stat().st_size for p in sources)
        combined = hashlib.sha256("".join(digests).encode()).hexdigest()
        print(f"{folder}: {len(jobs)} images, {total / len(jobs) / 1e6:.2f} MB each on average, sha256 {combined}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
