#!/usr/bin/env python3
"""The quantization grid of docs/model-card.md: onnxruntime's options, each against the fp32 model.

    scripts/quantize-grid.py --results grid.jsonl [--configs NAME ...]    # run (skips those done)
    scripts/quantize-grid.py --results grid.jsonl --table                 # the markdown table
    scripts/quantize-grid.py --list                                       # the configurations

Every configuration is calibrated on the same images (`--calibration-count`, spread over the
folder as `mobiserve quantize` picks them) and judged on all the others: top-1 agreement with the
fp32 model (which needs no labels), top-1 accuracy, and ms per image at batch 1 and 16 (median of
interleaved runs, 2 intra-op threads, the server's session settings), timed side by side with the
zoo's int8 model in the same process, so the ratio to it holds even when the machine's speed
drifts between chunks. The zoo's int8 itself is the row "zoo-int8". Run it in chunks (a few
minutes each) on an otherwise quiet machine:

    scripts/quantize-grid.py --results grid.jsonl --configs zoo-int8 minmax entropy

Configurations with a calibration count other than the default are judged on the images outside
their own calibration set (a different count of them), as the command does. `--extra DIR` adds
agreement on more images (no labels needed), e.g. the 1, 4 and 12 MP re-encodes of the sample
(scripts/make-photos.py), leaving out those made from a calibration image: 415 images alone
measure agreement to about +-1 point (one standard error). The full grid, as docs/model-card.md has it:

    P=/tmp/mobiserve-photos; for chunk in 0 1 2 3; do
      scripts/quantize-grid.py --results grid.jsonl --extra $P/1mp --extra $P/4mp --extra $P/12mp \
      --cache /tmp/grid-cache --chunk $chunk/4; done
    scripts/quantize-grid.py --results grid.jsonl --table
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobiserve.common.labels import Labels
from mobiserve.server.processing.normalize import assemble
from mobiserve.server.processing.postprocess import rank
from mobiserve.server.processing.preprocess import ImageLimits, preprocess_encoded
from mobiserve.server.runtime.session import SessionTuning, open_session
from mobiserve.server.workflows.dataset import scan, spread
from mobiserve.server.workflows.quantize import QuantizeOptions, quantize

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
Q = QuantizeOptions
MINMAX = Q(per_channel=True, method="minmax", format="qdq", activations="u8")
P9999 = dataclasses.replace(MINMAX, method="percentile", percentile=99.99)
# name -> (options, calibration count): each choice alone from MinMax, then combined with the best method
CONFIGS: dict[str, tuple[QuantizeOptions, int]] = {
    "minmax": (MINMAX, 100),
    "per-tensor": (dataclasses.replace(MINMAX, per_channel=False), 100),
    "entropy": (dataclasses.replace(MINMAX, method="entropy"), 100),
    **{
        f"percentile-{p:g}": (dataclasses.replace(MINMAX, method="percentile", percentile=p), 100)
        for p in (99.9, 99.95, 99.98, 99.99, 99.995, 99.999)
    },
    "qoperator": (dataclasses.replace(MINMAX, format="qoperator"), 100),
    "s8": (dataclasses.replace(MINMAX, activations="s8"), 100),
    "u8-symmetric": (dataclasses.replace(MINMAX, symmetric_activations=True), 100),
    "s8-symmetric": (dataclasses.replace(MINMAX, activations="s8", symmetric_activations=True), 100),
    "float-first-conv": (dataclasses.replace(MINMAX, keep_float=("first-conv",)), 100),
    "float-classifier": (dataclasses.replace(MINMAX, keep_float=("classifier",)), 100),
    "float-both": (dataclasses.replace(MINMAX, keep_float=("first-conv", "classifier")), 100),
    **{f"minmax+calibration-{n}": (MINMAX, n) for n in (25, 50, 200, 300)},
    "percentile-99.99+qoperator": (dataclasses.replace(P9999, format="qoperator"), 100),
    "percentile-99.99+s8": (dataclasses.replace(P9999, activations="s8"), 100),
    "percentile-99.99+float-first-conv": (dataclasses.replace(P9999, keep_float=("first-conv",)), 100),
    "percentile-99.99+float-classifier": (dataclasses.replace(P9999, keep_float=("classifier",)), 100),
    "percentile-99.99+float-both": (dataclasses.replace(P9999, keep_float=("first-conv", "classifier")), 100),
    **{f"percentile-99.99+calibration-{n}": (P9999, n) for n in (25, 50, 200, 300)},
    "entropy+qoperator": (dataclasses.replace(MINMAX, method="entropy", format="qoperator"), 100),
}
ZOO = "zoo-int8"


@dataclass
class Images:
    """Preprocessed crops of a folder, in file order, with labels (-1: none) and file stems."""

    crops: list[np.ndarray]
    labels: np.ndarray
    stems: list[str]


def load(folder: Path, labels: Labels, cache: Path | None) -> Images:
    """The server's exact preprocessing of every image (cached: the 12 MP set takes a while)."""
    found = scan(folder, labels)
    stems = [p.stem for p in found.files]
    truth = np.array([found.labelled.get(p, -1) for p in found.files])
    saved = cache / f"crops-{folder.name}-{len(stems)}.npy" if cache else None
    if saved and saved.exists():
        return Images(list(np.load(saved)), truth, stems)
    limits = ImageLimits()
    with ThreadPoolExecutor(2) as pool:
        crops = list(pool.map(lambda p: preprocess_encoded(p.read_bytes(), limits), found.files))
    if saved:
        np.save(saved, np.stack(crops))
    return Images(crops, truth, stems)


def top1(session: object, name: str, crops: list[np.ndarray]) -> np.ndarray:
    run = session.run  # type: ignore[attr-defined]
    # `rank`: the server's order, ties included (the zoo's int8 scores are quantized and tie)
    return np.concatenate(
        [rank(run(None, {name: assemble(crops[i : i + 32])})[0])[:, 0] for i in range(0, len(crops), 32)]
    )


def timings(sessions: dict[str, object], name: str, crops: list[np.ndarray], rounds: int) -> dict[str, float]:
    """ms per image at batch 1 and 16, CPU of the whole process ("cpu1", "cpu16": what a run
    costs, whatever else the machine does meanwhile) and wall ("wall1", "wall16"), as "<key>_cpu1"
    etc.: medians of rounds that run every session once, order reversed every other round, so that
    each follows the other as often as itself."""
    result: dict[str, float] = {}
    keys = list(sessions)
    for size, count in ((1, rounds), (16, max(rounds // 4, 5))):
        batch = assemble([crops[i % len(crops)] for i in range(size)])
        wall: dict[str, list[float]] = {k: [] for k in keys}
        cpu: dict[str, list[float]] = {k: [] for k in keys}
        for key in keys:  # warm-up
            sessions[key].run(None, {name: batch})  # type: ignore[attr-defined]
        for r in range(count):
            for key in keys if r % 2 == 0 else reversed(keys):
                started, used = time.perf_counter(), time.process_time()
                sessions[key].run(None, {name: batch})  # type: ignore[attr-defined]
                cpu[key].append(time.process_time() - used)
                wall[key].append(time.perf_counter() - started)
        for key in keys:
            result[f"{key}_wall{size}"] = statistics.median(wall[key]) * 1000 / size
            result[f"{key}_cpu{size}"] = statistics.median(cpu[key]) * 1000 / size
    return result


def run(args: argparse.Namespace) -> None:
    done = set()
    if args.results.exists():
        done = {json.loads(line)["name"] for line in args.results.read_text().splitlines() if line.strip()}
    names = args.configs or [ZOO, *CONFIGS]
    if args.chunk:
        index, count = (int(v) for v in args.chunk.split("/"))
        names = names[index::count]
    todo = [n for n in names if n not in done]
    if not todo:
        print("all done", file=sys.stderr)
        return
    labels = Labels.load(args.synsets)
    sample = load(args.images, labels, args.cache)
    extras = [load(folder, labels, args.cache) for folder in args.extra]
    tuning = SessionTuning(intra_op_threads=2)
    fp32 = open_session(str(args.fp32), tuning)
    zoo = open_session(str(args.zoo), tuning)
    name = fp32.get_inputs()[0].name
    fp32_top1 = [top1(fp32, name, images.crops) for images in (sample, *extras)]
    zoo_top1 = [top1(zoo, name, images.crops) for images in (sample, *extras)]
    # fp32's cost, once per run, beside the zoo's
    fp32_ms = timings({"zoo": zoo, "fp32": fp32}, name, sample.crops, args.rounds)
    for config in todo:
        count = args.calibration_count if config == ZOO else CONFIGS[config][1]
        picked = set(spread(count, len(sample.crops)))
        calibration_stems = {sample.stems[i] for i in picked}
        options = None if config == ZOO else CONFIGS[config][0]
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            out = args.zoo
            if options is not None:
                out = Path(tmp) / "int8.onnx"
                with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # onnxruntime's chatter
                    quantize(args.fp32, name, [sample.crops[i] for i in sorted(picked)], out, options)
            took = time.perf_counter() - started
            session = open_session(str(out), tuning)  # for the zoo: a second session, a check of the timing
        held = np.array([i for i in range(len(sample.crops)) if i not in picked])
        predicted = top1(session, name, sample.crops)
        labelled = held[sample.labels[held] >= 0]
        # on the re-encodes: agreement and top-1 of this model, the zoo's and fp32's, outside calibration
        tally = dict.fromkeys(("same", "zoo_same", "right", "zoo_right", "fp32_right", "total", "labelled"), 0)
        for images, reference, zoo_guess in zip(extras, fp32_top1[1:], zoo_top1[1:]):
            keep = np.array([i for i, stem in enumerate(images.stems) if stem not in calibration_stems])
            known = keep[images.labels[keep] >= 0]
            guess = top1(session, name, images.crops)
            tally["same"] += int(np.sum(guess[keep] == reference[keep]))
            tally["zoo_same"] += int(np.sum(zoo_guess[keep] == reference[keep]))
            truth = images.labels[known]
            tally["right"] += int(np.sum(guess[known] == truth))
            tally["zoo_right"] += int(np.sum(zoo_guess[known] == truth))
            tally["fp32_right"] += int(np.sum(reference[known] == truth))
            tally["total"] += len(keep)
            tally["labelled"] += len(known)
        total, labelled_extra = tally["total"], tally["labelled"]
        ms = timings({"zoo": zoo, "this": session}, name, [sample.crops[i] for i in held], args.rounds)
        row = {
            "name": config,
            "options": dataclasses.asdict(options) if options else "the ONNX model zoo's int8",
            "calibration_images": count,
            "eval_images": len(held),
            "labelled_eval_images": len(labelled),
            "agreement": float(np.mean(predicted[held] == fp32_top1[0][held])),
            "top1": float(np.mean(predicted[labelled] == sample.labels[labelled])),
            "fp32_top1": float(np.mean(fp32_top1[0][labelled] == sample.labels[labelled])),
            "zoo_agreement": float(np.mean(zoo_top1[0][held] == fp32_top1[0][held])),
            "zoo_top1": float(np.mean(zoo_top1[0][labelled] == sample.labels[labelled])),
            "extra_agreement": tally["same"] / total if total else None,
            "extra_zoo_agreement": tally["zoo_same"] / total if total else None,
            "extra_top1": tally["right"] / labelled_extra if labelled_extra else None,
            "extra_zoo_top1": tally["zoo_right"] / labelled_extra if labelled_extra else None,
            "extra_fp32_top1": tally["fp32_right"] / labelled_extra if labelled_extra else None,
            "extra_images": total,
            "extra_folders": [str(f) for f in args.extra],
            **{f"ms_{k.removeprefix('this_')}": v for k, v in ms.items() if k.startswith("this_")},
            **{f"zoo_ms_{k.removeprefix('zoo_')}": v for k, v in ms.items() if k.startswith("zoo_")},
            **{f"fp32_ms_{k.removeprefix('fp32_')}": v for k, v in fp32_ms.items() if k.startswith("fp32_")},
            **{f"zoo_fp32_run_ms_{k.removeprefix('zoo_')}": v for k, v in fp32_ms.items() if k.startswith("zoo_")},
            "quantize_s": took,
            "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        with args.results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        extra = f", {row['extra_agreement']:.3f} on {total} others" if total else ""
        print(
            f"{config}: agreement {row['agreement']:.3f} top-1 {row['top1']:.4f} on {len(held)}{extra}; CPU "
            f"batch 1 {row['ms_cpu1']:.2f} ms ({row['ms_cpu1'] / row['zoo_ms_cpu1']:.2f}x zoo), "
            f"batch 16 {row['ms_cpu16']:.2f} ms/img ({row['ms_cpu16'] / row['zoo_ms_cpu16']:.2f}x zoo)",
            file=sys.stderr,
            flush=True,
        )


def table(args: argparse.Namespace) -> None:
    """Sorted by agreement on all the held-out inputs (the sample's and the re-encodes), the
    measure the default is chosen by; the zoo's figures are on each row's own held-out images."""
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]

    def overall(r: dict[str, Any], key: str = "") -> float:
        n, extra = r["eval_images"], r["extra_images"] or 0
        return (r[f"{key}agreement"] * n + (r[f"extra_{key}agreement"] or 0) * extra) / (n + extra)

    print(
        "| configuration | agreement with fp32: held-out sample / re-encodes / all | top-1: sample / re-encodes "
        "| zoo int8 on the same images: agreement (all) / top-1 (sample) | CPU ms/image, batch 1 / 16 "
        "(x zoo int8, same run) | held-out sample images |"
    )
    print("|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (-overall(r), -r["agreement"])):
        b1, b16 = r["ms_cpu1"] / r["zoo_ms_cpu1"], r["ms_cpu16"] / r["zoo_ms_cpu16"]
        extra = f"{r['extra_agreement']:.1%}" if r["extra_agreement"] is not None else "-"
        extra_top1 = f"{r['extra_top1']:.2%}" if r["extra_top1"] is not None else "-"
        print(
            f"| {r['name']} | {r['agreement']:.1%} / {extra} / **{overall(r):.1%}** | {r['top1']:.2%} / {extra_top1} "
            f"| {overall(r, 'zoo_'):.1%} / {r['zoo_top1']:.2%} | {r['ms_cpu1']:.2f} / {r['ms_cpu16']:.2f} "
            f"({b1:.2f}x / {b16:.2f}x) | {r['eval_images']} |"
        )
    first = next(r for r in rows if r["calibration_images"] == args.calibration_count)
    print(
        f"\nfp32 stand-in on the same held-out images: top-1 {first['fp32_top1']:.2%} (sample), "
        f"{first['extra_fp32_top1']:.2%} (re-encodes); CPU ms/image {first['fp32_ms_cpu1']:.2f} at batch 1, "
        f"{first['fp32_ms_cpu16']:.2f} at batch 16 ({first['fp32_ms_cpu1'] / first['zoo_fp32_run_ms_cpu1']:.2f}x "
        f"and {first['fp32_ms_cpu16'] / first['zoo_fp32_run_ms_cpu16']:.2f}x the zoo int8's, same run)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, help="JSON-lines file the rows are appended to")
    parser.add_argument("--configs", nargs="*", help="configurations to run (default: all not yet in --results)")
    parser.add_argument("--chunk", metavar="I/N", help="run only every N-th configuration from the I-th (0-based)")
    parser.add_argument("--table", action="store_true", help="print the results as a markdown table")
    parser.add_argument("--list", action="store_true", help="list the configurations")
    parser.add_argument("--fp32", type=Path, default=SHARED / "models" / "mobilenetv2-12-fp32-dequant.onnx")
    parser.add_argument("--zoo", type=Path, default=SHARED / "models" / "mobilenetv2-12-int8.onnx")
    parser.add_argument("--images", type=Path, default=SHARED / "data" / "imagenet-sample")
    parser.add_argument("--synsets", type=Path, default=SHARED / "data" / "imagenet-synsets.txt")
    parser.add_argument("--calibration-count", type=int, default=100)
    parser.add_argument(
        "--extra",
        type=Path,
        action="append",
        default=[],
        help="more folders to measure agreement on (e.g. the 1/4/12 MP re-encodes); files named as a "
        "calibration image are left out",
    )
    parser.add_argument("--cache", type=Path, help="folder to keep the preprocessed crops in between runs")
    parser.add_argument("--rounds", type=int, default=300, help="batch-1 timing rounds (batch 16: a quarter)")
    args = parser.parse_args()
    if args.list:
        for name, (options, count) in CONFIGS.items():
            print(f"{name}: {options.describe()}, {count} calibration images")
        return
    if args.results is None:
        parser.error("--results FILE is needed")
    (table if args.table else run)(args)


if __name__ == "__main__":
    main()
