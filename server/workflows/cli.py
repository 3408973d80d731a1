"""`mobiserve evaluate` and `mobiserve quantize`: the card's validation and quantization steps.

Both run in-process (no server) on the server's own preprocessing and `Model`. Results go to
stdout (a table, or one JSON object with --json); progress bars and notes go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mobiserve.common.command import fail, missing
from mobiserve.common.labels import IMAGENET_SYNSETS
from mobiserve.server.cli import SERVER_MODULES

if TYPE_CHECKING:  # the workflows import onnxruntime's quantizer and numpy: only when they run
    from mobiserve.common.command import Subcommands
    from mobiserve.common.labels import Labels
    from mobiserve.server.runtime.model import Model
    from mobiserve.server.workflows.dataset import LabelledImage
    from mobiserve.server.workflows.evaluate import Scored, Skipped
    from mobiserve.server.workflows.quantize import QuantizeOptions

# quantize.py maps these to onnxruntime's (named here so that building the parser imports nothing)
METHODS = ("minmax", "entropy", "percentile")
FORMATS = ("qdq", "qoperator")
ACTIVATIONS = ("u8", "s8")
KEEP_FLOAT = ("first-conv", "classifier")
EVALUATE_BATCH_SIZES = [1, 8, 16, 32]

# The card's table (ONNX model zoo, MobileNetV2-1.0 vs its int8, ImageNet validation, Xeon 8280, batch 1).
CARD_FP32, CARD_INT8, CARD_SPEEDUP = (0.6948, 0.8926), (0.6830, 0.8844), 1.05


def register(sub: Subcommands) -> None:
    """Add this module's subcommands to the `mobiserve` parser."""
    p = sub.add_parser("evaluate", help="top-1/top-5 and speed of a model on labelled images, in-process")
    p.add_argument("model", metavar="MODEL", help="ONNX model file")
    p.add_argument(
        "--images",
        required=True,
        metavar="DIR",
        help="labelled images: <wnid>_*.JPEG files or ImageNet-style <wnid>/ folders",
    )
    _common(p)
    p.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=EVALUATE_BATCH_SIZES,
        metavar="N",
        help="batch sizes to time side by side; accuracy runs at the largest "
        f"(default: {' '.join(map(str, EVALUATE_BATCH_SIZES))})",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=20,
        help="timing rounds, each running every batch size once (default: %(default)s; 0: accuracy only)",
    )
    p.add_argument(
        "--decode",
        choices=("exact", "fast"),
        default="exact",
        help="JPEG decoding as `mobiserve serve --decode` does it (fast: large JPEGs at 1/2-1/8 scale)",
    )
    p.set_defaults(func=_evaluate)

    q = sub.add_parser("quantize", help="int8 static quantization of an fp32 model, then the card's comparison")
    q.add_argument("model", metavar="FP32_MODEL", help="fp32 ONNX model file")
    q.add_argument("--calibration", required=True, metavar="DIR", help="folder of calibration images")
    q.add_argument("--output", required=True, metavar="INT8_MODEL", help="where to write the int8 model")
    q.add_argument(
        "--calibration-count",
        type=int,
        default=100,
        metavar="N",
        help="images to calibrate on, spread over the folder; the rest are held out for the comparison "
        "(default: %(default)s)",
    )
    q.add_argument(
        "--eval",
        metavar="DIR",
        help="images to compare on, instead of the held-out ones (any that are calibration images are left out)",
    )
    o = q.add_argument_group(
        "quantization",
        "the defaults agreed best with fp32 among options as fast as the zoo's int8 (docs/model-card.md)",
    )
    o.add_argument("--format", choices=FORMATS, default=None, help="QDQ nodes or QOperator ops (default: qdq)")
    o.add_argument("--method", choices=METHODS, default=None, help="calibration method (default: entropy)")
    o.add_argument(
        "--percentile", type=float, default=None, help="with --method percentile: the range kept (default: 99.99)"
    )
    o.add_argument(
        "--per-channel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one weight scale per output channel (needs opset 13; older models are upgraded; default: on)",
    )
    o.add_argument("--activations", choices=ACTIVATIONS, default=None, help="activation type (default: u8)")
    o.add_argument(
        "--symmetric-activations",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="activation ranges symmetric around 0 (default: off)",
    )
    o.add_argument(
        "--keep-float",
        action="append",
        choices=KEEP_FLOAT,
        default=None,
        metavar="PART",
        help=f"leave a part in float: {' or '.join(KEEP_FLOAT)}; repeat for both (default: none)",
    )
    _common(q)
    q.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="batch size of the accuracy runs (default: %(default)s)"
    )
    q.add_argument(
        "--rounds", type=int, default=50, help="interleaved batch-1 timing runs of each model (default: %(default)s)"
    )
    q.set_defaults(func=_quantize)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--synsets",
        default=str(IMAGENET_SYNSETS),
        help="labels file, '<wnid> <name>' per line in output order (default: ImageNet-1k, shipped with mobiserve)",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="onnxruntime intra-op threads (default %(default)s: all cores)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _load(path: str, labels: Labels, threads: int) -> Model:
    """One session with the server's tuning, given all cores: nothing else runs beside it."""
    from mobiserve.server.runtime.model import Model
    from mobiserve.server.runtime.session import SessionTuning, default_intra_op_threads

    return Model(path, labels, SessionTuning(intra_op_threads=threads or default_intra_op_threads(1)))


def _note(message: str) -> None:
    print(f"mobiserve: {message}", file=sys.stderr)


def _report_skipped(skipped: Sequence[Skipped]) -> None:
    if skipped:
        _note(f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0].path}: {skipped[0].reason}")


# ------------------------------------------------------------------------------------- evaluate


def _evaluate(args: argparse.Namespace) -> int:
    if hint := missing("server", *SERVER_MODULES, "tqdm"):
        return fail(hint)
    from mobiserve.common.labels import Labels
    from mobiserve.server.cores import available_cores
    from mobiserve.server.errors import ModelLoadError
    from mobiserve.server.workflows import evaluate as ev
    from mobiserve.server.workflows.dataset import DatasetError, labelled_images

    if min(args.batch_size) < 1:
        return fail("--batch-size values must be at least 1")
    try:
        labels = Labels.load(args.synsets)
        images = labelled_images(args.images, labels)
        model = _load(args.model, labels, args.threads)
    except (DatasetError, ModelLoadError, ValueError, OSError) as exc:
        return fail(str(exc))
    sizes = sorted(set(args.batch_size))
    scored = ev.score(
        [model], images, batch_size=sizes[-1], threads=available_cores(), keep=sizes[-1], decode=args.decode
    )
    _report_skipped(scored.skipped)
    accuracy = scored.accuracy[0]
    if accuracy.count == 0:
        return fail(f"none of the {len(images)} labelled images in {args.images} could be read")
    speed = ev.speed(model, scored.samples, sizes, args.rounds) if args.rounds > 0 else None
    result: dict[str, object] = {
        "top1": accuracy.top1,
        "top5": accuracy.top5,
        "count": accuracy.count,
        "skipped": len(scored.skipped),
        "model": args.model,
        "images": args.images,
        "decode": args.decode,
        "intra_op_threads": model.tuning.intra_op_threads,
    }
    if speed:
        result.update(
            {
                "latency_ms_batch1": speed.latency_ms,
                "throughput_images_per_s": speed.throughput[speed.best_batch_size],
                "best_batch_size": speed.best_batch_size,
                "throughput_by_batch_size": {str(k): v for k, v in speed.throughput.items()},
                "timing_rounds": speed.rounds,
            }
        )
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{Path(args.model).name} on {accuracy.count} images from {args.images}: "
        f"top-1 {accuracy.top1:.2%}  top-5 {accuracy.top5:.2%}" + ("  (fast decode)" if args.decode == "fast" else "")
    )
    if speed:
        per_size = ", ".join(f"batch {k}: {v:.0f}" for k, v in speed.throughput.items())
        print(
            f"latency at batch 1: {speed.latency_ms:.2f} ms (median of {speed.rounds}); "
            f"throughput {speed.throughput[speed.best_batch_size]:.0f} images/s at batch {speed.best_batch_size} "
            f"({per_size}); {model.tuning.intra_op_threads} intra-op threads"
        )
    return 0


# ------------------------------------------------------------------------------------- quantize


def _quantize(args: argparse.Namespace) -> int:
    if hint := missing("server", *SERVER_MODULES, "tqdm", "onnx"):
        return fail(hint)
    import numpy as np

    from mobiserve.common.labels import Labels
    from mobiserve.server.cores import available_cores
    from mobiserve.server.errors import ModelLoadError
    from mobiserve.server.processing.preprocess import ImageLimits
    from mobiserve.server.workflows import evaluate as ev
    from mobiserve.server.workflows.quantize import QuantizeError, check_float_model, first_line, quantize

    if args.calibration_count < 1:
        return fail("--calibration-count must be at least 1")
    output = Path(args.output)
    try:
        options = quantize_options(args)
        labels = Labels.load(args.synsets)
        check_float_model(args.model)
        fp32 = _load(args.model, labels, args.threads)
        if output.resolve() == Path(args.model).resolve():
            raise QuantizeError("--output must differ from the fp32 model")
        if not output.parent.is_dir():
            raise QuantizeError(f"cannot write {output}: folder {output.parent} does not exist")
        sets = _image_sets(args, labels)
    except (QuantizeError, ModelLoadError, ValueError, OSError) as exc:
        return fail(str(exc))

    threads = available_cores()
    loaded = [c for _, c in ev.read_crops(sets.calibration, threads, ImageLimits(), 2 * threads, "reading")]
    crops = [c for c in loaded if isinstance(c, np.ndarray)]
    _report_skipped([c for c in loaded if isinstance(c, ev.Skipped)])
    try:
        quantize(args.model, fp32.input_name, crops, output, options)
        int8 = _load(str(output), labels, args.threads)
    except (QuantizeError, ModelLoadError) as exc:
        return fail(str(exc))
    except Exception as exc:  # onnxruntime's quantizer raises assorted types on models it cannot handle
        return fail(f"quantization failed: {first_line(exc)}")

    scored = None
    sample = crops
    if sets.compare:
        scored = ev.score([fp32, int8], sets.compare, args.batch_size, threads, keep=1)
        _report_skipped(scored.skipped)
        sample = scored.samples or crops
    else:
        _note(f"no images left to compare on; pass --eval DIR ({output} is written)")
    medians = ev.interleaved_medians(
        {"fp32": lambda: fp32.infer(sample[:1]), "int8": lambda: int8.infer(sample[:1])}, args.rounds
    )
    result = _comparison(args, options, len(crops), sets, scored, medians)
    print(json.dumps(result) if args.json else _table(result))
    return 0


def quantize_options(args: argparse.Namespace) -> QuantizeOptions:
    """The options given, the defaults for the rest."""
    from mobiserve.server.workflows.quantize import QuantizeOptions

    given = {
        "format": args.format,
        "method": args.method,
        "percentile": args.percentile,
        "per_channel": args.per_channel,
        "activations": args.activations,
        "symmetric_activations": args.symmetric_activations,
        "keep_float": None if args.keep_float is None else tuple(dict.fromkeys(args.keep_float)),
    }
    return QuantizeOptions(**{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class _ImageSets:
    """Calibration images and the images the models are compared on: never the same image."""

    calibration: list[Path]
    compare: list[LabelledImage]  # label -1: unlabelled, compared for agreement only
    source: str  # where the compared images come from, for people
    left_out: int  # --eval images left out because they are calibration images too


def _image_sets(args: argparse.Namespace, labels: Labels) -> _ImageSets:
    from mobiserve.server.workflows.dataset import DatasetError, every_image, same_files, scan, spread

    folder = scan(args.calibration, labels)
    if not folder.files:
        raise DatasetError(f"no images in calibration folder {args.calibration} (JPEG, PNG, WebP, BMP, GIF, TIFF)")
    picked = set(spread(args.calibration_count, len(folder.files)))
    calibration = [f for i, f in enumerate(folder.files) if i in picked]
    if not args.eval:
        held_out = [f for i, f in enumerate(folder.files) if i not in picked]
        return _ImageSets(calibration, every_image(folder, held_out), "held out of the calibration folder", 0)
    other = scan(args.eval, labels)
    if not other.files:
        raise DatasetError(f"no images in --eval folder {args.eval}")
    repeated = same_files(calibration, other.files)
    kept = [f for f in other.files if f not in repeated]
    return _ImageSets(calibration, every_image(other, kept), args.eval, len(repeated))


def _comparison(
    args: argparse.Namespace,
    options: QuantizeOptions,
    calibrated: int,
    sets: _ImageSets,
    scored: Scored | None,
    medians: dict[str, float],
) -> dict[str, object]:
    """The card's figures as one dict: agreement and accuracy of each model, decline ratios, batch-1 speed-up."""
    from mobiserve.server.runtime.session import default_intra_op_threads

    accuracy = scored.accuracy if scored else None
    result: dict[str, object] = {
        "output": args.output,
        "options": options.describe(),
        "format": options.format,
        "method": options.method,
        "per_channel": options.per_channel,
        "activations": options.activations,
        "symmetric_activations": options.symmetric_activations,
        "keep_float": list(options.keep_float),
        "calibration_images": calibrated,
        "eval_images": len(scored.top1[0]) if scored else 0,
        "labelled_eval_images": accuracy[0].count if accuracy else 0,
        "eval_source": sets.source,
        "disjoint": True,  # by construction (_image_sets); said so on stdout
        "eval_left_out_as_calibration_images": sets.left_out,
        "intra_op_threads": args.threads or default_intra_op_threads(1),
        "timing_rounds": max(args.rounds, 1),
        "speedup_batch1": medians["fp32"] / medians["int8"],
    }
    if scored:
        result["agreement"] = scored.agreement(0, 1)
    for i, (name, path) in enumerate((("fp32", args.model), ("int8", args.output))):
        entry: dict[str, object] = {"model": path, "latency_ms_batch1": medians[name] * 1000}
        if accuracy and accuracy[i].count:
            entry.update(top1=accuracy[i].top1, top5=accuracy[i].top5)
        result[name] = entry
    if accuracy and accuracy[0].count:
        before, after = accuracy
        result["top1_decline_ratio"] = (before.top1 - after.top1) / before.top1 if before.top1 else 0.0
        result["top5_decline_ratio"] = (before.top5 - after.top5) / before.top5 if before.top5 else 0.0
    return result


def _table(r: dict[str, object]) -> str:
    fp32, int8 = r["fp32"], r["int8"]
    assert isinstance(fp32, dict) and isinstance(int8, dict)
    lines = [
        f"wrote {r['output']}: {r['options']}",
        f"calibrated on {r['calibration_images']} images; compared on {r['eval_images']} other images "
        f"({r['eval_source']}): none of them is a calibration image"
        + (
            f" ({r['eval_left_out_as_calibration_images']} --eval images left out: they are calibration images)"
            if r["eval_left_out_as_calibration_images"]
            else ""
        ),
        "",
        "| model | top-1 | top-5 | agreement with fp32 (top-1) | latency, batch 1 |",
        "|---|---|---|---|---|",
    ]
    for name, entry in (("fp32", fp32), ("int8", int8)):
        top = f"{entry['top1']:.2%} | {entry['top5']:.2%}" if "top1" in entry else "- | -"
        agree = "" if "agreement" not in r else "(the reference)" if name == "fp32" else f"{r['agreement']:.2%}"
        lines.append(
            f"| {name} {Path(str(entry['model'])).name} | {top} | {agree} | {entry['latency_ms_batch1']:.2f} ms |"
        )
    lines.append("")
    if "agreement" in r:
        labelled = f" ({r['labelled_eval_images']} labelled)" if r["labelled_eval_images"] != r["eval_images"] else ""
        where = f"on {r['eval_images']} images{labelled}: the same top-1 class on {r['agreement']:.2%};"
    else:
        where = "(no images to compare on):"
    decline = (
        f"top-1 decline ratio {r['top1_decline_ratio']:.2%}, top-5 decline ratio {r['top5_decline_ratio']:.2%}, "
        if "top1_decline_ratio" in r
        else ""
    )
    lines.append(
        f"int8 vs fp32 {where} {decline}int8 {r['speedup_batch1']:.2f}x faster at batch 1 "
        f"(medians of {r['timing_rounds']} interleaved runs, {r['intra_op_threads']} intra-op threads)"
    )
    (c1, c5), (q1, q5) = CARD_FP32, CARD_INT8
    lines.append(
        f"the card (ImageNet validation, 50,000 images, Xeon 8280): {c1:.2%}/{c5:.2%} -> {q1:.2%}/{q5:.2%}, "
        f"decline ratio {(c1 - q1) / c1:.2%}/{(c5 - q5) / c5:.2%}, int8 {CARD_SPEEDUP:.2f}x faster"
    )
    return "\n".join(lines)
