"""`mobiserve bench`: sweep a server's throughput and latency, compare with in-process references.

This module parses and orchestrates; `loadgen` makes the load, `servers` starts the servers the
run needs, `baseline` measures the in-process references, `report` writes the results.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobiserve.bench.cpu import GIL_RATE
from mobiserve.bench.loadgen import BenchError, Load, StepResult, Workload
from mobiserve.common.command import fail, missing
from mobiserve.common.datasets import IMAGE_SUFFIXES, image_files
from mobiserve.server.cli import SERVER_MODULES

if TYPE_CHECKING:
    from mobiserve.bench.report import Report
    from mobiserve.common.command import Subcommands


def register(sub: Subcommands) -> None:
    """Add this module's subcommands to the `mobiserve` parser."""
    p = sub.add_parser(
        "bench",
        help="load-test a server: concurrency or rate sweep, baselines, report",
        description="Measure a mobiserve server's throughput and latency (closed-loop concurrency sweep or "
        "open-loop Poisson rate), optionally beside in-process references and an unbatched server; "
        "writes a table, JSON, CSV and a PNG plot into --output.",
    )
    where = p.add_argument_group("server")
    where.add_argument(
        "--target", default="127.0.0.1:50051", help="HOST:PORT of a running server to measure (default: %(default)s)"
    )
    where.add_argument(
        "--serve",
        nargs="?",
        const="",
        metavar="ARGS",
        help="start `mobiserve serve ARGS` on a free 127.0.0.1 port for the run instead "
        "(quote the arguments: --serve='--model m.onnx --max-batch-size 16')",
    )
    where.add_argument("--model", default="", help="model name to request (default: the server's default)")
    load = p.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        help="closed loop: requests in flight, one step each (default: 1,2,4,8,16,32,64; with --mixed: "
        "the unary caller's, 1)",
    )
    load.add_argument("--rate", help="open loop instead: requests/s with Poisson arrivals, one step each (e.g. 50,100)")
    load.add_argument("--duration", type=float, default=10.0, help="seconds measured per step (default: %(default)s)")
    load.add_argument("--requests", type=int, help="measure this many requests per step instead of --duration")
    load.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of unmeasured load before each step (default: %(default)s)"
    )
    load.add_argument(
        "--mode",
        choices=("unary", "stream"),
        default="unary",
        help="Classify calls, or one pipelined ClassifyStream per client process (default: %(default)s)",
    )
    load.add_argument("--images", type=Path, help="folder of images to send (JPEG bytes as they are)")
    load.add_argument(
        "--tensor",
        action="store_true",
        help="send float32 [3, 224, 224] inputs instead, made once up front by the server's preprocessing",
    )
    load.add_argument("--batch", type=int, default=1, help="images per request (default: %(default)s)")
    load.add_argument(
        "--client-processes",
        type=int,
        default=0,
        help="load-generating processes (0: min(concurrency, max(2, cores / 4)))",
    )
    load.add_argument(
        "--connections",
        type=int,
        default=1,
        help="connections per load process, unary calls over them in turn; a server with --workers N "
        "spreads connections over its workers, so give it at least N in all (default: %(default)s)",
    )
    load.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: %(default)s)")
    mixed = p.add_argument_group(
        "mixed traffic",
        "a unary caller beside bulk streams: each alone, together, and together in one lane (the control)",
    )
    mixed.add_argument(
        "--mixed",
        action="store_true",
        help="measure one unary caller (1 image per call, --concurrency in flight) beside --streams "
        "ClassifyStream clients instead of a sweep",
    )
    mixed.add_argument(
        "--streams", type=int, default=4, help="bulk streams, one connection each (default: %(default)s)"
    )
    mixed.add_argument("--window", type=int, default=16, help="messages in flight per stream (default: %(default)s)")
    mixed.add_argument("--stream-batch", type=int, default=8, help="images per stream message (default: %(default)s)")
    extra = p.add_argument_group("comparisons (local servers only)")
    extra.add_argument(
        "--baseline",
        action="store_true",
        help="also measure in-process throughput and latency with no gRPC (card's Pillow pipeline, "
        "mobiserve's own, onnxruntime alone) and the preprocessing cost per image",
    )
    extra.add_argument(
        "--baseline-seconds",
        type=float,
        default=8.0,
        help="seconds per in-process throughput figure (default: %(default)s)",
    )
    extra.add_argument(
        "--preprocess-report",
        action="store_true",
        help="also measure ms/image of the card's Pillow preprocessing against mobiserve's",
    )
    extra.add_argument(
        "--compare-unbatched",
        action="store_true",
        help="also run the same sweep against a plain unbatched gRPC server on the same model",
    )
    extra.add_argument(
        "--gil",
        action="store_true",
        help="also sample which thread holds the GIL with py-spy (pip install py-spy) over each measured "
        "window of a server the harness starts and of the in-process pipelines: GIL ms per image by role",
    )
    p.add_argument("--output", type=Path, help="report folder (default: reports/bench-<timestamp>)")
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    if hint := missing("bench", *SERVER_MODULES, "tqdm"):
        return fail(hint)
    from mobiserve.bench.cpu import SamplingError

    try:
        run(args)
    except (BenchError, SamplingError) as exc:
        return fail(str(exc))
    return 0


def run(args: argparse.Namespace) -> None:
    from mobiserve.bench import report as rep
    from mobiserve.bench.servers import is_local, mobiserve_server, unbatched_server

    if args.mixed:
        return _mixed(args)
    loads = _loads(args)
    images = _images(args.images)
    serve_args = None if args.serve is None else shlex.split(args.serve)
    managed = serve_args is not None
    compare = args.baseline or args.compare_unbatched
    if compare and not (managed or is_local(args.target)):
        raise BenchError(
            "--baseline and --compare-unbatched compare with this machine: the target must be "
            f"127.0.0.1 or localhost (or use --serve), not {args.target}"
        )
    if args.gil:
        from mobiserve.bench.cpu import py_spy

        if py_spy() is None:
            raise BenchError("--gil samples with py-spy, which is not installed: pip install py-spy")
        if not managed and not args.baseline:
            raise BenchError("--gil samples the processes the harness runs: use it with --serve or --baseline")
    out = args.output or Path("reports") / time.strftime("bench-%Y%m%d-%H%M%S")
    machine = rep.machine()
    report = rep.Report(
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
        command=sys.argv,
        machine=machine,
        target=args.target,
        server={},
        settings=_settings(args, loads, len(images)),
    )
    with ExitStack() as stack:
        server_pid = None
        if serve_args is not None:
            server = stack.enter_context(mobiserve_server(serve_args, out / "server.log"))
            report.target, server_pid = server.target, server.pid
        report.server = _model_info(report.target, args.model) | ({"serve_args": args.serve} if managed else {})
        model_path = _model_path(report.server) if compare else ""  # checked before minutes of load
        report.steps = _sweep(
            _workload(args, report.target, images), loads, "mobiserve", machine.cores, server_pid, args.gil
        )
    if args.compare_unbatched:
        with unbatched_server(model_path, out / "unbatched.log") as unbatched:
            workload = _workload(args, unbatched.target, images, model="")
            report.unbatched = _sweep(workload, loads, "unbatched", machine.cores, unbatched.pid, args.gil)
    if args.baseline or args.preprocess_report:
        _references(report, args, images, model_path)
    report.ratios = rep.headline_ratios(report)
    rep.print_table(report, sys.stdout)
    paths = rep.write_all(report, out)
    print(f"\nreport: {', '.join(str(p) for p in paths)}")


def _mixed(args: argparse.Namespace) -> None:
    from mobiserve.bench import mixed
    from mobiserve.bench import report as rep
    from mobiserve.bench.servers import mobiserve_server

    if args.rate or args.requests or args.baseline or args.compare_unbatched or args.gil:
        raise BenchError("--mixed runs its own phases: leave out --rate, --requests and the comparisons")
    (unary_c,) = _numbers(args.concurrency or "1", "--concurrency", int)[:1]
    if min(args.streams, args.window, args.stream_batch) < 1 or args.duration <= 0 or args.warmup < 0:
        raise BenchError("--streams, --window, --stream-batch and --duration must be positive")
    load = mixed.MixedLoad(unary_c, args.streams, args.window, args.stream_batch, args.duration, args.warmup)
    images = _images(args.images)
    out = args.output or Path("reports") / time.strftime("mixed-%Y%m%d-%H%M%S")
    report = mixed.MixedReport(
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
        command=sys.argv,
        machine=rep.machine(),
        target=args.target,
        server={},
        load=load,
    )
    with ExitStack() as stack:
        if args.serve is not None:
            server = stack.enter_context(mobiserve_server(shlex.split(args.serve), out / "server.log"))
            report.target = server.target
        report.server = _model_info(report.target, args.model) | (
            {"serve_args": args.serve} if args.serve is not None else {}
        )
        report.phases = mixed.run_mixed(_workload(args, report.target, images), load, report.machine.cores)
    report.ratios = mixed.ratios(report.phases)
    mixed.print_table(report, sys.stdout)
    paths = mixed.write(report, out)
    print(f"\nreport: {', '.join(str(p) for p in paths)}")


def _sweep(
    workload: Workload, loads: list[Load], server: str, cores: int, pid: int | None, gil: bool = False
) -> list[StepResult]:
    from tqdm import tqdm

    from mobiserve.bench.cpu import Probe
    from mobiserve.bench.loadgen import run_step

    steps = []
    for load in loads:
        label = f"{server} " + (f"c={load.concurrency}" if load.closed else f"{load.rate:g} req/s")
        step = run_step(workload, load, server, cores, Probe(pid, gil, children=True) if pid else None, label)
        errors = sum(step.errors.values())
        tqdm.write(
            f"{label}: {step.img_s:.1f} img/s, p50 {step.p50_ms:.1f} ms, p99 {step.p99_ms:.1f} ms, "
            f"{step.ok} ok, {errors} errors, client cpu {step.client_cpu_pct:.0f}%",
            file=sys.stderr,
        )
        steps.append(step)
    return steps


def _references(report: Report, args: argparse.Namespace, images: list[Path], model_path: str) -> None:
    from mobiserve.bench import baseline
    from mobiserve.server.config import ModelConfig
    from mobiserve.server.cores import available_cores

    data = [p.read_bytes() for p in images]
    print("in-process references (no gRPC) ...", file=sys.stderr)
    if args.baseline:
        s = report.server
        config = ModelConfig(
            name=s["name"],
            path=model_path,
            max_batch_size=s["max_batch_size"],
            instances=s["instances"],
            intra_op_threads=s["intra_op_threads"],
        )
        report.baseline = baseline.measure(config, data, args.baseline_seconds, available_cores(), args.gil)
    report.preprocess = baseline.preprocess_report(data)


# ------------------------------------------------------------------------------- parsing, checks


def _loads(args: argparse.Namespace) -> list[Load]:
    from mobiserve.server.cores import available_cores

    if args.requests is not None and args.requests < 1:
        raise BenchError(f"--requests must be at least 1, got {args.requests}")
    if args.duration <= 0 or args.warmup < 0 or args.timeout <= 0:
        raise BenchError("--duration and --timeout must be positive and --warmup not negative")
    if not 1 <= args.batch <= 256:
        raise BenchError(f"--batch must be between 1 and 256, got {args.batch}")
    if args.connections < 1:
        raise BenchError(f"--connections must be at least 1, got {args.connections}")
    if args.client_processes < 0:
        raise BenchError(f"--client-processes must be 0 (automatic) or more, got {args.client_processes}")
    auto = max(2, available_cores() // 4)
    timing: dict[str, Any] = {
        "duration_s": None if args.requests else args.duration,
        "requests": args.requests,
        "warmup_s": args.warmup,
    }
    if args.rate:
        rates = _numbers(args.rate, "--rate", float)
        return [Load(rate=r, processes=args.client_processes or auto, **timing) for r in rates]
    levels = _numbers(args.concurrency or "1,2,4,8,16,32,64", "--concurrency", int)
    return [Load(concurrency=c, processes=args.client_processes or min(c, auto), **timing) for c in levels]


def _numbers(text: str, flag: str, kind: type) -> list[Any]:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"{flag} takes a comma-separated list of numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise BenchError(f"{flag} values must be positive, got {text!r}")
    return values


def _images(folder: Path | None) -> list[Path]:
    if folder is None:
        raise BenchError(
            "give --images DIR: a folder of images to send (with --tensor too: they are preprocessed once)"
        )
    if not folder.is_dir():
        raise BenchError(f"--images: {folder} is not a folder")
    images = image_files(folder)
    if not images:
        raise BenchError(f"--images: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return images


def _workload(args: argparse.Namespace, target: str, images: list[Path], model: str | None = None) -> Workload:
    return Workload(
        target=target,
        images=tuple(str(p) for p in images),
        mode=args.mode,
        tensor=args.tensor,
        batch=args.batch,
        model=args.model if model is None else model,
        timeout_s=args.timeout,
        connections=args.connections,
    )


def _settings(args: argparse.Namespace, loads: list[Load], images: int) -> dict[str, Any]:
    return {
        "loop": "closed" if loads[0].closed else "open",
        "mode": args.mode,
        "inputs": "tensor" if args.tensor else "jpeg",
        "batch": args.batch,
        "images": str(args.images),
        "image_count": images,
        "duration_s": loads[0].duration_s,
        "requests": args.requests,
        "warmup_s": args.warmup,
        "timeout_s": args.timeout,
        "concurrency": [ld.concurrency for ld in loads] if loads[0].closed else [],
        "rate": [ld.rate for ld in loads] if not loads[0].closed else [],
        "client_processes": [ld.processes for ld in loads],
        "gil_sampling": f"py-spy record --gil --nonblocking at {GIL_RATE} Hz" if args.gil else None,
    }


def _model_info(target: str, model: str) -> dict[str, Any]:
    """ListModels' entry for the model the load asks for; {} if the server does not list models."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from mobiserve.bench.loadgen import CHANNEL_OPTIONS
    from mobiserve.v1 import classifier_pb2 as pb
    from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        try:
            listed = pb_grpc.ClassifierStub(channel).ListModels(pb.ListModelsRequest(), timeout=30).models
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return {}
            raise BenchError(f"cannot list {target}'s models: {exc.code().name}: {exc.details()}") from None
    for info in listed:
        if info.name == model or (not model and info.is_default):
            return MessageToDict(info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    raise BenchError(f"model {model!r} is not served at {target}; it serves {', '.join(m.name for m in listed)}")


def _model_path(server: dict[str, Any]) -> str:
    """The served ONNX file, for the in-process references and the unbatched server."""
    path = str(server.get("path", ""))
    if not path or not Path(path).is_file():
        raise BenchError(
            f"the comparisons load the server's model file, but {path or 'its path'!r} "
            "(from ListModels) is not a file here: start the server with --expose-model-paths, or use --serve"
        )
    return path
