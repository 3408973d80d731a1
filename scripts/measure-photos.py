#!/usr/bin/env python3
"""The figures of docs/performance.md's "Large photos": exact against fast decode, per photo size.

    scripts/make-photos.py ../shared/data/imagenet-sample /tmp/mobiserve-photos      # the sets, once
    S=../shared/data/imagenet-sample P=/tmp/mobiserve-photos
    scripts/measure-photos.py answers   $S $P/1mp $P/4mp $P/12mp     # agreement and top-1 (deterministic)
    scripts/measure-photos.py sensitivity $P/12mp                     # why agreement stops where it does
    scripts/measure-photos.py cost $S $P/1mp $P/4mp $P/12mp         # ms/image
    scripts/measure-photos.py serve $P/12mp                          # c=32 through a server, per folder

`answers`: for each model (the zoo's int8 and the fp32 stand-in), top-1 accuracy with the exact
and the fast decode, and how often the two give the same top-1 class (agreement).
`sensitivity`: how many levels the fast decode moves the crops' values, and how often each model
changes its top-1 when a share of the exact crops' values move by one level at random.
`cost`: preprocessing ms per image on one thread (decode + resize + crop, `preprocess_encoded`),
exact and fast timed alternately on the same images (`--count` of them, spread over the folder),
medians over the images; also the client's `shrink="resize"` (Pillow) for comparison.
`serve`: `mobiserve bench` at concurrency 32 against `mobiserve serve --model INT8 [--decode fast]`,
exact and fast alternately (`--rounds` of each) for each folder, in the same run: images/s
and the ratio of each exact/fast pair, server CPU ms per image, the load generator's CPU (it
shares the machine), p50/p99. Run `cost` and `serve` on an otherwise quiet machine: they measure time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mobiserve.client._shrink import shrunk
from mobiserve.common.labels import Labels
from mobiserve.server.processing.preprocess import ImageLimits, preprocess_encoded
from mobiserve.server.runtime.model import Model
from mobiserve.server.runtime.session import SessionTuning
from mobiserve.server.workflows.dataset import labelled_images, spread

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = {"int8": "mobilenetv2-12-int8.onnx", "fp32": "mobilenetv2-12-fp32-dequant.onnx"}
LIMITS = ImageLimits()


def answers(folders: list[Path], synsets: Path) -> None:
    labels = Labels.load(synsets)
    models = {n: Model(SHARED / "models" / f, labels, SessionTuning(intra_op_threads=2)) for n, f in MODELS.items()}
    print("| images | model | top-1 exact | top-1 fast | difference (points) | agreement fast/exact |")
    print("|---|---|---|---|---|---|")
    for folder in folders:
        images = labelled_images(folder, labels)
        truth = np.array([i.label for i in images])
        data = [i.path.read_bytes() for i in images]
        top1 = {}
        with ThreadPoolExecutor(2) as pool:
            for mode in ("exact", "fast"):
                crops = list(pool.map(lambda d, m=mode: preprocess_encoded(d, LIMITS, m), data))
                for name, model in models.items():
                    top1[mode, name] = np.concatenate(
                        [model.infer(crops[i : i + 32]).order[:, 0] for i in range(0, len(crops), 32)]
                    )
        for name in models:
            exact, fast = (float(np.mean(top1[m, name] == truth)) for m in ("exact", "fast"))
            agree = np.mean(top1["exact", name] == top1["fast", name])
            print(
                f"| {folder.name} ({len(images)}) | {name} | {exact:.2%} | {fast:.2%} | {(fast - exact) * 100:+.2f} "
                f"| {agree:.1%} ({int(np.sum(top1['exact', name] != top1['fast', name]))} differ) |",
                flush=True,
            )


def sensitivity(folders: list[Path], synsets: Path) -> None:
    """Why agreement cannot reach 99% on the int8 model: how far the fast path moves pixels, and
    how often each model changes its top-1 when a few input values move by one level."""
    labels = Labels.load(synsets)
    models = {n: Model(SHARED / "models" / f, labels, SessionTuning(intra_op_threads=2)) for n, f in MODELS.items()}
    print("| images | change to the exact crops | mean / p99 / max change (levels) | top-1 changed: int8 | fp32 |")
    print("|---|---|---|---|---|")
    for folder in folders:
        data = [i.path.read_bytes() for i in labelled_images(folder, labels)]
        with ThreadPoolExecutor(2) as pool:
            exact = list(pool.map(lambda d: preprocess_encoded(d, LIMITS), data))
            fast = list(pool.map(lambda d: preprocess_encoded(d, LIMITS, "fast"), data))
        rng = np.random.default_rng(0)
        changed = {"fast decode": fast}
        for share in (0.0001, 0.001, 0.01):
            moved = []
            for crop in exact:
                step = (rng.random(crop.shape) < share) * rng.choice(np.array([-1, 1], np.int16), crop.shape)
                moved.append((crop.astype(np.int16) + step).clip(0, 255).astype(np.uint8))
            changed[f"{share:.2%} of values +-1"] = moved
        base = {n: _top1(m, exact) for n, m in models.items()}
        for what, crops in changed.items():
            diff = np.concatenate([np.abs(a.astype(np.int16) - b).ravel() for a, b in zip(crops, exact)])
            flips = " | ".join(f"{np.mean(_top1(m, crops) != base[n]):.1%}" for n, m in models.items())
            print(
                f"| {folder.name} | {what} | {diff.mean():.2f} / {np.percentile(diff, 99):.0f} / {diff.max()} "
                f"| {flips} |",
                flush=True,
            )


def _top1(model: Model, crops: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([model.infer(crops[i : i + 32]).order[:, 0] for i in range(0, len(crops), 32)])


def cost(folders: list[Path], count: int, repeats: int) -> None:
    print('| images | exact ms/image | fast ms/image | exact / fast | client shrink="resize" ms/image |')
    print("|---|---|---|---|---|")
    for folder in folders:
        files = sorted(folder.glob("*.JPEG"))
        data = [files[i].read_bytes() for i in spread(count, len(files))]
        times: dict[str, list[float]] = {"exact": [], "fast": [], "shrink": []}
        cases = {
            "exact": lambda d: preprocess_encoded(d, LIMITS, "exact"),
            "fast": lambda d: preprocess_encoded(d, LIMITS, "fast"),
            "shrink": lambda d: shrunk(d, "resize"),
        }
        for n, d in enumerate(data):
            per: dict[str, list[float]] = {k: [] for k in cases}
            keys = list(cases) if n % 2 == 0 else list(reversed(cases))
            for key in keys:
                cases[key](d)  # warm: the file's pages, the resize tables
            for _ in range(repeats):
                for key in keys:
                    started = time.perf_counter()
                    cases[key](d)
                    per[key].append(time.perf_counter() - started)
            for key in cases:
                times[key].append(statistics.median(per[key]) * 1000)
        exact, fast, shrink = (statistics.median(times[k]) for k in ("exact", "fast", "shrink"))
        print(
            f"| {folder.name} ({len(data)}) | {exact:.2f} | {fast:.2f} | {exact / fast:.2f}x | {shrink:.2f} |",
            flush=True,
        )


def serve(folders: list[Path], model: Path, duration: float, concurrency: int, rounds: int, keep: Path | None) -> None:
    """Exact and fast alternately (exact, fast, fast, exact, ...), `rounds` runs of each: the
    machine's drift falls on both; medians, and the ratio of each round's pair."""
    print(
        "| images | decode | images/s (median) | x exact (median of rounds) | server CPU ms/image | "
        "load generator CPU % of the machine | p50 ms | p99 ms | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for folder in folders:
        steps: dict[str, list[dict[str, Any]]] = {"exact": [], "fast": []}
        for r in range(rounds):
            for mode in ("exact", "fast") if r % 2 == 0 else ("fast", "exact"):
                steps[mode].append(_bench(folder, model, mode, duration, concurrency, keep, r))
        ratios = [f["img_s"] / e["img_s"] for e, f in zip(steps["exact"], steps["fast"])]
        for mode, runs in steps.items():
            ratio = f"{statistics.median(ratios):.2f}x ({', '.join(f'{x:.2f}' for x in ratios)})"
            print(
                f"| {folder.name} | {mode} | {_median(runs, 'img_s'):.1f} | {ratio if mode == 'fast' else '1'} "
                f"| {_median(runs, 'cpu_ms_img'):.1f} | {_median(runs, 'client_cpu_pct'):.0f} "
                f"| {_median(runs, 'p50_ms'):.0f} | {_median(runs, 'p99_ms'):.0f} "
                f"| {sum(sum(s['errors'].values()) for s in runs)} |",
                flush=True,
            )


def _median(steps: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(s[key] or 0) for s in steps)


def _bench(
    folder: Path, model: Path, mode: str, duration: float, concurrency: int, keep: Path | None, round_: int
) -> dict[str, Any]:
    """One `mobiserve bench` run against a server it starts; its step, as bench.json has it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = keep / f"{folder.name}-{mode}-{round_}" if keep else Path(tmp)
        serve_args = f"--model {model}" + (" --decode fast" if mode == "fast" else "")
        command = [
            str(Path(sys.executable).parent / "mobiserve"),
            "bench",
            f"--serve={serve_args}",
            "--images",
            str(folder),
            "--concurrency",
            str(concurrency),
            "--duration",
            str(duration),
            "--output",
            str(out),
        ]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        step: dict[str, Any] = json.loads((out / "bench.json").read_text())["steps"][0]
        return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("answers", "sensitivity", "cost", "serve"))
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--synsets", type=Path, default=SHARED / "data" / "imagenet-synsets.txt")
    parser.add_argument("--count", type=int, default=60, help="cost: images per folder (default 60)")
    parser.add_argument("--repeats", type=int, default=3, help="cost: timed runs of each image and path (default 3)")
    parser.add_argument("--model", type=Path, default=SHARED / "models" / MODELS["int8"], help="serve: the model")
    parser.add_argument("--duration", type=float, default=10.0, help="serve: seconds measured per run (default 10)")
    parser.add_argument("--concurrency", type=int, default=32, help="serve: requests in flight (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="serve: runs of each decode, alternated (default 3)")
    parser.add_argument("--keep", type=Path, help="serve: keep each run's bench report in this folder")
    args = parser.parse_args()
    print(f"<!-- {' '.join(sys.argv)}, {time.strftime('%Y-%m-%d %H:%M')} -->")
    if args.part == "answers":
        answers(args.folders, args.synsets)
    elif args.part == "sensitivity":
        sensitivity(args.folders, args.synsets)
    elif args.part == "cost":
        cost(args.folders, args.count, args.repeats)
    else:
        serve(args.folders, args.model, args.duration, args.concurrency, args.rounds, args.keep)


if __name__ == "__main__":
    main()
