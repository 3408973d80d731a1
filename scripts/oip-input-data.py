#!/usr/bin/env python3
"""Write a perf_analyzer `--input-data` JSON file for a mobiserve model.

    scripts/oip-input-data.py jpeg ../shared/data/imagenet-sample out.json [--count 64]
    scripts/oip-input-data.py fp32 out.json [--count 8] [--seed 0]

`jpeg`: one step per image file, each the BYTES input `encoded_image` of a model's image face
(`-m int8_image`; perf_analyzer cycles through the steps). `fp32`: random inputs for the network
itself (`-m int8`), its `input` (FP32 [3, 224, 224] per image, drawn like normalised pixels).
perf_analyzer's own random data would fill a BYTES input with random strings, not images.
perf_analyzer sends a `b64` value as the tensor's raw bytes, so a BYTES element is written in
the protocol's raw form: a 4-byte little-endian length, then the bytes.
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".webp", ".bmp"}


def jpeg_steps(folder: Path, count: int) -> list[dict[str, object]]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        sys.exit(f"no images in {folder}")
    steps = []
    for f in files:
        data = f.read_bytes()
        steps.append({"encoded_image": {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode()}})
    return steps


def fp32_steps(count: int, seed: int) -> list[dict[str, object]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(count):
        tensor = rng.standard_normal((3, 224, 224), dtype=np.float32).astype("<f4")
        steps.append({"input": {"b64": base64.b64encode(tensor.tobytes()).decode()}})
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    jpeg = sub.add_parser("jpeg", help="encoded images from a folder")
    jpeg.add_argument("folder", type=Path)
    jpeg.add_argument("output", type=Path)
    jpeg.add_argument("--count", type=int, default=64)
    fp32 = sub.add_parser("fp32", help="random preprocessed tensors")
    fp32.add_argument("output", type=Path)
    fp32.add_argument("--count", type=int, default=8)
    fp32.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    steps = jpeg_steps(args.folder, args.count) if args.kind == "jpeg" else fp32_steps(args.count, args.seed)
    args.output.write_text(json.dumps({"data": steps}))
    print(f"{args.output}: {len(steps)} steps", file=sys.stderr)


if __name__ == "__main__":
    main()
