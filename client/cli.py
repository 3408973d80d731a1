"""The client's commands: `mobiserve classify`, `validate`, `models` (list a server's models, or
pull the zoo's files) and `health`. They need only the thin client install.

Every user-facing failure (a bad path, no server, a refused image) ends in one line on stderr
and exit status 1; `--json` output goes to stdout alone, so it can be piped.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from mobiserve.client import (
    DEFAULT_TARGET,
    TARGET_ENV,
    Classification,
    Client,
    InvalidArgument,
    MobiserveError,
    Unavailable,
    default_target,
)
from mobiserve.client._base import DEFAULT_MAX_IN_FLIGHT, DEFAULT_TOP_K, checked_target
from mobiserve.client._tls import speaks_tls
from mobiserve.client.validation import Tally
from mobiserve.common import zoo
from mobiserve.common.command import fail
from mobiserve.common.datasets import labelled_images
from mobiserve.common.labels import Labels

Command = Callable[[argparse.Namespace], int]

if TYPE_CHECKING:
    from mobiserve.common.command import Subcommands


def register(sub: Subcommands) -> None:
    """Add this module's subcommands to the `mobiserve` parser."""
    p = sub.add_parser("classify", help="classify image files with a running server")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, BMP, GIF, TIFF)")
    p.add_argument(
        "--top-k", type=_at_least(1), default=DEFAULT_TOP_K, metavar="K", help="classes per image (default %(default)s)"
    )
    p.add_argument(
        "--shrink",
        choices=("resize", "crop"),
        help="scale large images down here before sending, as the server would (same answer; needs Pillow): "
        "resize to a 256-pixel shorter side, or crop to the 224x224 model input",
    )
    _add_call_options(p)
    p.set_defaults(func=_classify)

    p = sub.add_parser(
        "validate",
        help="top-1 / top-5 accuracy of a labelled image folder, classified by a running server",
        description="DIR holds <wnid>_<anything>.<ext> files, or ImageNet-style <wnid>/ folders of images; "
        "other image files are skipped and counted. A progress bar shows on a terminal when tqdm is installed "
        "(pip install tqdm; the server extra has it).",
    )
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument(
        "--synsets",
        type=Path,
        metavar="FILE",
        help="'<wnid> <name>' per line: names the classes, and labels are its first column "
        "(default: labels are ImageNet wnids, compared with the wnids the server answers with)",
    )
    p.add_argument(
        "--worst", type=_at_least(0), default=10, metavar="N", help="worst classes to list (default %(default)s)"
    )
    p.add_argument(
        "--max-in-flight",
        type=_at_least(1),
        default=DEFAULT_MAX_IN_FLIGHT,
        metavar="N",
        help="images in flight at once (default %(default)s)",
    )
    _add_call_options(p)
    p.set_defaults(func=_validate)

    p = sub.add_parser("models", help="list a server's models, or pull the zoo's models")
    _add_target(p)  # no ACTION: list what the server at --target serves (ListModels)
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.set_defaults(func=_models)
    actions = p.add_subparsers(metavar="ACTION")
    pull = actions.add_parser(
        "pull",
        help="download the zoo's MobileNetV2 models, checked (int8: sha256; fp32: its inputs and outputs)",
    )
    pull.add_argument("names", nargs="*", metavar="NAME", help=f"which models ({', '.join(zoo.ZOO)}; default all)")
    pull.add_argument("--dir", type=Path, default=zoo.DEFAULT_MODELS_DIR, help="models folder (default: %(default)s)")
    pull.add_argument("--from", dest="source", help=f"a folder or base URL holding the files (or ${zoo.MIRROR_ENV})")
    pull.set_defaults(func=_pull)

    p = sub.add_parser(
        "health",
        help="ask a server's gRPC health service; exit 0 when it is SERVING",
        description="Prints the status (SERVING, NOT_SERVING, SERVICE_UNKNOWN) and exits 0 only for SERVING: "
        "for scripts, probes and container health checks.",
    )
    _add_target(p)
    p.add_argument("--service", default="", help="service to ask about (default: the whole server)")
    p.add_argument("--timeout", type=_positive, default=5.0, metavar="S", help="seconds (default %(default)g)")
    p.set_defaults(func=_health)


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        type=_target,
        metavar="HOST:PORT",
        help="server address, or several balanced by round_robin: ipv4:H:P,H:P or dns:///host:port "
        f"(default ${TARGET_ENV}, else {DEFAULT_TARGET})",
    )
    tls = parser.add_argument_group("TLS", "for a server started with --tls-cert (default: plaintext)")
    tls.add_argument("--tls", action="store_true", help="TLS, trusting the system's certificate authorities")
    tls.add_argument("--tls-ca", metavar="PEM", help="TLS, trusting this CA certificate (implies --tls)")
    tls.add_argument(
        "--tls-cert", metavar="PEM", help="client certificate, for a server that asks for one (mutual TLS)"
    )
    tls.add_argument("--tls-key", metavar="PEM", help="its private key")


def _client(args: argparse.Namespace, **settings: Any) -> Client:
    """The client the flags describe: target and TLS."""
    return Client(args.target, credentials=_credentials(args), **settings)


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))


def _uses_tls(args: argparse.Namespace) -> bool:
    return bool(args.tls or args.tls_ca or args.tls_cert)


def _unreachable(args: argparse.Namespace, target: str, exc: MobiserveError) -> str:
    """Why a server did not answer, with a hint when the reason is TLS on one side only."""
    if not _uses_tls(args) and speaks_tls(target):
        return (
            f"server {target} speaks TLS and this call was plaintext: give --tls-ca CA.pem (or --tls for a "
            "certificate from a public authority), and --tls-cert/--tls-key if it asks for a client certificate"
        )
    if _uses_tls(args) and any(word in exc.message for word in ("WRONG_VERSION_NUMBER", "handshake failed")):
        return f"server {target} is unavailable over TLS ({exc.message}); does it serve plaintext? then drop --tls*"
    return f"server {target} is unavailable: {exc}"


class UsageError(ValueError):
    """Options that do not go together: exit status 2 before any network, as argparse's own."""


def _at_least(minimum: int) -> Callable[[str], int]:
    def number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return number


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _target(text: str) -> str:
    try:
        return checked_target(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_call_options(parser: argparse.ArgumentParser) -> None:
    _add_target(parser)
    parser.add_argument("--model", help="model name (default: the server's default model)")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")


def _reported(command: Command) -> Command:
    """The errors a user can meet become one line on stderr and exit status 1."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except UsageError as exc:
            return fail(str(exc), 2)
        except Unavailable as exc:
            return fail(_unreachable(args, args.target or default_target(), exc))
        except MobiserveError as exc:
            return fail(f"{exc.message} ({exc.code.name})")
        except (OSError, ValueError) as exc:
            return fail(str(exc))

    return run


def _image_failure(exc: MobiserveError, paths: Sequence[Path]) -> int:
    """A refused image in a stream: name its file. Other errors are not the file's."""
    if exc.input_index is None or not isinstance(exc, InvalidArgument):
        raise exc
    return fail(f"{paths[exc.input_index]}: {exc.message} ({exc.code.name})")


# ------------------------------------------------------------------------------------- classify


@_reported
def _classify(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.images]
    for path in paths:
        if not path.is_file():
            return fail(f"cannot read {path}: {'not a file' if path.exists() else 'no such file'}")
    if args.shrink and importlib.util.find_spec("PIL") is None:
        return fail("--shrink needs Pillow to decode and resize images here: pip install 'pillow>=13'")
    answers: list[dict[str, Any]] = []
    with _client(args) as client:
        try:
            results = client.classify_many(paths, top_k=args.top_k, model=args.model, shrink=args.shrink)
            for path, result in zip(paths, results):
                if args.json:
                    answers.append({"image": str(path), **dataclasses.asdict(result)})
                else:
                    _print_classes(path, result)
        except MobiserveError as exc:
            return _image_failure(exc, paths)
    if args.json:
        print(json.dumps(answers, indent=2))
    return 0


def _print_classes(path: Path, result: Classification) -> None:
    print(f"{path}  (model {result.model})")
    rows = [[str(rank), c.name, c.wnid, f"{c.score:.4f}"] for rank, c in enumerate(result.classes, 1)]
    _print_table(["rank", "class", "wnid", "probability"], rows, right={0, 3})
    print()


# ------------------------------------------------------------------------------------- validate


@_reported
def _validate(args: argparse.Namespace) -> int:
    if not args.dir.is_dir():
        return fail(f"not a folder: {args.dir}")
    names: dict[str, str] = {}
    if args.synsets:
        labels = Labels.load(args.synsets)
        names = dict(zip(labels.wnids, labels.names))
    found = labelled_images(args.dir, names or None)
    if found.skipped:
        why = "a label in --synsets" if names else "a <wnid>_ prefix or <wnid>/ folder (wnid: n and 8 digits)"
        print(
            f"mobiserve: skipped {len(found.skipped)} image file(s) without {why}, e.g. {found.skipped[0]}",
            file=sys.stderr,
        )
    if not found.images:
        return fail(f"no labelled images in {args.dir} (expected <wnid>_<anything>.<ext> files or <wnid>/ folders)")
    paths = [item.path for item in found.images]
    tally = Tally(names=dict(names))
    model = ""
    with _client(args) as client:
        started = time.perf_counter()
        try:
            results = client.classify_many(paths, top_k=5, model=args.model, max_in_flight=args.max_in_flight)
            for item, result in zip(found.images, _progress(results, len(paths))):
                tally.add(item.label, result)
                model = result.model
        except MobiserveError as exc:
            return _image_failure(exc, paths)
        seconds = time.perf_counter() - started
        target = client.target
    top1, top5 = tally.accuracy()
    report = {
        "top1": top1,
        "top5": top5,
        "count": tally.count,
        "skipped": len(found.skipped),
        "seconds": round(seconds, 3),
        "images_per_second": round(tally.count / seconds, 1),
        "model": model,
        "target": target,
        "worst_classes": tally.worst(args.worst),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0


def _progress(results: Iterator[Classification], total: int) -> Iterator[Classification]:
    """A progress bar on a terminal's stderr when tqdm is installed (it is optional here)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return results
    return iter(tqdm(results, total=total, unit="img", file=sys.stderr, disable=None, leave=False))


def _print_report(report: dict[str, Any]) -> None:
    print(
        f"{report['count']} images from {report['model']} at {report['target']} in {report['seconds']:.1f} s "
        f"({report['images_per_second']:.1f} images/s)"
    )
    print(f"top-1 accuracy  {report['top1']:.4f}")
    print(f"top-5 accuracy  {report['top5']:.4f}")
    if report["worst_classes"]:
        print("\nworst classes by top-1:")
        rows = [
            [w["wnid"], str(w["count"]), f"{w['top1']:.2f}", f"{w['top5']:.2f}", w["name"]]
            for w in report["worst_classes"]
        ]
        _print_table(["wnid", "images", "top-1", "top-5", "class"], rows, right={1, 2, 3})


# --------------------------------------------------------------------------------------- models


@_reported
def _models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list_models()
    if args.json:
        print(json.dumps([dataclasses.asdict(m) for m in models], indent=2))
        return 0
    rows = [
        [
            m.name + (" (default)" if m.is_default else ""),
            m.version,
            str(m.num_classes),
            str(m.max_batch_size),
            f"{m.max_queue_delay_ms:g}",
            str(m.instances),
            m.path,
        ]
        for m in models
    ]
    header = ["model", "version", "classes", "max batch", "delay ms", "instances", "path"]
    _print_table(header, rows, right={2, 3, 4, 5})
    return 0


def _pull(args: argparse.Namespace) -> int:
    unknown = set(args.names) - set(zoo.ZOO)
    if unknown:
        return fail(f"unknown model(s) {sorted(unknown)}; the zoo entries are {', '.join(zoo.ZOO)}")
    status = 0
    for name in args.names or list(zoo.ZOO):
        model = zoo.ZOO[name]
        try:
            path = zoo.pull(model, args.dir, args.source)
        except zoo.ZooError as exc:
            status = fail(str(exc))
            continue
        if model.sha256:
            checked = "sha256 verified"
        else:
            checked = (
                f"an ONNX model with input float [N, 3, {model.input_size}, {model.input_size}] and output float "
                f"[N, {model.classes}]; sha256 {zoo.sha256_of(path)}, not pinned: compare with the zoo's"
            )
        print(f"{name}: {path} ({checked})")
    return status


# --------------------------------------------------------------------------------------- health


def _health(args: argparse.Namespace) -> int:
    """Not `_reported`: an unreachable server is an answer here (exit 1), not an error."""
    try:
        client = _client(args, retry=None)
    except UsageError as exc:
        return fail(str(exc), 2)
    except (OSError, ValueError) as exc:
        return fail(str(exc))
    with client:
        try:
            status = client.health(args.service, timeout=args.timeout)
        except MobiserveError as exc:
            if isinstance(exc, Unavailable) and not _uses_tls(args) and speaks_tls(client.target):
                print(f"{client.target}: unreachable: {_unreachable(args, client.target, exc)}")
            else:
                print(f"{client.target}: unreachable: {exc.message} ({exc.code.name})")
            return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _print_table(header: list[str], rows: list[list[str]], right: set[int]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        print("  " + "  ".join(cells).rstrip())
