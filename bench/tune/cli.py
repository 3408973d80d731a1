"""`mobiserve tune`: parse, check, then search within the time budget and write the pick."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobiserve.common import zoo
from mobiserve.common.command import fail, missing
from mobiserve.common.datasets import IMAGE_SUFFIXES, image_files

if TYPE_CHECKING:  # the thin install has `mobiserve` (and so this module) but not the bench extra
    from mobiserve.bench.tune.measure import Setup, Windows
    from mobiserve.bench.tune.output import Served
    from mobiserve.bench.tune.space import Budget, Candidate, Trial
    from mobiserve.common.command import Subcommands

SAMPLE = Path("../shared/data/imagenet-sample")  # the project's sample, beside a checkout
WRITE_RESERVE_S = 5.0  # kept from the budget for the report and the config
SERVER_START_S = 12.0  # a first guess at starting a server, before one has been timed
CLIENT_START_S = 1.5  # ... and at starting a step's load processes


class TuneError(RuntimeError):
    """Bad arguments or a setup that cannot be measured: one line, exit 2."""


def register(sub: Subcommands) -> None:
    p = sub.add_parser(
        "tune",
        help="find the fastest serving configuration within a latency budget on this machine; write it as TOML",
        description="Serve the model in configurations of workers x intra-op threads x lone-request threads x "
        "max batch size x queue delay, measure each (lone-request latency, saturated throughput, latency at a "
        "target rate), coarse to fine within --budget seconds, and write the configuration with the best "
        "throughput that meets the latency budget as a file `mobiserve serve --config` takes.",
    )
    p.add_argument("--model", type=Path, help="ONNX model (default: the zoo's int8 model in ./models)")
    p.add_argument("--name", help="the model's name in the config (default: its file name without .onnx)")
    p.add_argument("--synsets", type=Path, help="labels file, as for `mobiserve serve` (default: ImageNet-1k)")
    p.add_argument("--images", type=Path, help=f"folder of images to send (default: {SAMPLE} when it exists)")
    p.add_argument("--budget", type=float, default=300.0, help="seconds for the whole run (default: %(default)s)")
    p.add_argument("--p50-ms", type=float, help="lone-request and target-rate median latency must stay under this")
    p.add_argument("--p99-ms", type=float, help="99th percentile latency at the target rate must stay under this")
    p.add_argument(
        "--rate",
        type=float,
        help="target rate for the open loop, images/s (default: half of the first "
        "configuration's saturated throughput)",
    )
    p.add_argument(
        "--output", type=Path, default=Path("mobiserve-tuned.toml"), help="config file to write (default: %(default)s)"
    )
    p.add_argument("--report", type=Path, help="report folder: table, JSON, plot (default: reports/tune-<time>)")
    p.set_defaults(func=_tune)


def _tune(args: argparse.Namespace) -> int:
    from mobiserve.server.cli import SERVER_MODULES

    if hint := missing("bench", *SERVER_MODULES, "tqdm", "tomli_w"):
        return fail(hint)
    from mobiserve.bench.loadgen import BenchError

    try:
        plan = _checked(args)
    except TuneError as exc:
        return fail(str(exc), code=2)
    try:
        with _interruptible():
            return run(plan)
    except KeyboardInterrupt:
        print("mobiserve tune: interrupted; nothing written", file=sys.stderr)
        return 130
    except BenchError as exc:
        return fail(str(exc))


@dataclass(frozen=True)
class Plan:
    """Checked arguments."""

    served: Served
    setup: Setup
    budget: Budget
    seconds: float
    output: Path
    report: Path


def _checked(args: argparse.Namespace) -> Plan:
    from mobiserve.bench.tune.measure import Setup, Windows
    from mobiserve.bench.tune.output import Served
    from mobiserve.bench.tune.space import Budget
    from mobiserve.server.cores import machine_cores

    for flag, value in (("--budget", args.budget), ("--p50-ms", args.p50_ms), ("--p99-ms", args.p99_ms)):
        if value is not None and not value > 0:
            raise TuneError(f"{flag} must be positive, got {value:g}")
    if args.rate is not None and not args.rate > 0:
        raise TuneError(f"--rate must be positive (images/s), got {args.rate:g}")
    model = args.model or zoo.DEFAULT_MODELS_DIR / zoo.DEFAULT_MODEL.filename
    if not model.is_file():
        hint = "" if args.model else " (`mobiserve models pull` gets the zoo's; or give --model PATH)"
        raise TuneError(f"model file not found: {model}{hint}")
    if args.synsets is not None and not args.synsets.is_file():
        raise TuneError(f"--synsets: {args.synsets} is not a file")
    folder = args.images or SAMPLE
    if not folder.is_dir():
        raise TuneError(f"--images: {folder} is not a folder" + ("" if args.images else " (give --images DIR)"))
    images = image_files(folder)
    if not images:
        raise TuneError(f"--images: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    if args.output.is_dir():
        raise TuneError(f"--output: {args.output} is a folder; give the config file's path")
    cores = machine_cores()
    setup = Setup(images=tuple(str(p) for p in images), cores=cores, rate=args.rate or 0.0)
    least = SERVER_START_S + Windows().seconds + 3 * CLIENT_START_S + WRITE_RESERVE_S
    if args.budget < least:
        raise TuneError(f"--budget {args.budget:g} s is too short: one configuration takes about {least:.0f} s here")
    name = args.name or model.name.removesuffix(".onnx")
    report = args.report or Path("reports") / time.strftime("tune-%Y%m%d-%H%M%S")
    served = Served(model, name, args.synsets)
    return Plan(served, setup, Budget(args.p50_ms, args.p99_ms), args.budget, args.output, report)


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM stops a run as Ctrl-C does: servers stopped, nothing written."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------- the run


def run(plan: Plan) -> int:
    from tqdm import tqdm

    from mobiserve.bench.loadgen import BenchError
    from mobiserve.bench.report import machine
    from mobiserve.bench.tune import output
    from mobiserve.bench.tune.measure import Windows, measure
    from mobiserve.bench.tune.space import STAGES, Trial, finalists, ranked, stage_candidates

    started = time.monotonic()
    deadline = started + plan.seconds - WRITE_RESERVE_S
    setup, budget, served = plan.setup, plan.budget, plan.served
    trials: dict[Candidate, Trial] = {}
    windows = Windows()
    overhead = [SERVER_START_S + 3 * CLIENT_START_S]  # learnt: what a measurement takes beyond its windows
    skipped: list[str] = []
    bar = tqdm(
        total=round(plan.seconds), unit="s", desc="tune", disable=None, bar_format="{desc} {bar} {n:.0f}/{total} s"
    )
    ticker = _Ticker(bar, started)
    with tempfile.TemporaryDirectory(prefix="mobiserve-tune-") as scratch, ticker:

        def estimate(w: Windows) -> float:
            return max(overhead) + w.seconds

        def evaluate(candidate: Candidate, stage: str, w: Windows) -> bool:
            if time.monotonic() + estimate(w) > deadline:
                return False
            nonlocal setup
            trial = trials.setdefault(candidate, Trial(candidate, stage))
            config = Path(scratch) / f"{len(trials)}-{len(trial.runs)}.toml"
            output.write_atomic(config, output.config_text(candidate, served))
            ticker.say(f"{stage}: {candidate.label}")
            t0 = time.monotonic()
            try:
                figures = measure(config, candidate, setup, w, log=Path(scratch) / "server.log")
            except BenchError as exc:
                tqdm.write(f"{candidate.label}: {exc}", file=sys.stderr)
                return True
            overhead.append(time.monotonic() - t0 - w.seconds)
            trial.runs.append(figures)
            if not setup.rate:  # the open loop's rate is fixed by the first measurement
                setup = dataclasses.replace(setup, rate=figures.rate)
            tqdm.write(
                f"{stage:>5}  {candidate.label}: {figures.saturated_img_s:.1f} img/s saturated, lone p50 "
                f"{figures.lone_p50_ms:.2f} ms, at {figures.rate:.0f}/s p99 {figures.rate_p99_ms:.1f} ms"
                + (f", {figures.errors} errors" if figures.errors else ""),
                file=sys.stderr,
            )
            return True

        best: Candidate | None = None
        for stage in STAGES:
            for candidate in stage_candidates(stage, best, setup.cores):
                if candidate in trials:
                    continue
                if not evaluate(candidate, stage, windows):
                    skipped.append(stage)
                    break
            order = ranked(trials.values(), budget)
            best = order[0].candidate if order else best
            if skipped:
                break
        longer = windows.scaled(2)
        for trial in finalists(list(trials.values()), budget) if not skipped else []:
            if not evaluate(trial.candidate, "final", longer):
                skipped.append("final")
                break
    order = ranked(trials.values(), budget)
    pick = order[0] if order and budget.met(order[0]) else None
    summary = _summary(plan, setup, time.monotonic() - started, len(trials), skipped, pick)
    with output.report_folder(plan.report) as folder:
        paths = output.write_report(folder, order, budget, pick, summary, machine())
    output.print_table(order, budget, pick, sys.stdout)
    print(f"\nreport: {', '.join(str(plan.report / p.name) for p in paths)}")
    if pick is None:
        closest = f"; closest: {order[0].candidate.label}" if order else ""
        return _no_pick(f"no configuration met the latency budget{closest}; {plan.output} not written")
    header = [
        f"written by `mobiserve tune` on {time.strftime('%Y-%m-%d %H:%M')}: {pick.candidate.label}",
        f"{pick.mean('saturated_img_s'):.0f} images/s saturated, lone p50 {pick.mean('lone_p50_ms'):.1f} ms, "
        f"p99 {pick.mean('rate_p99_ms'):.1f} ms at {pick.mean('rate'):.0f}/s on {setup.cores} cores",
        f"report: {plan.report}",
    ]
    output.write_atomic(plan.output, output.config_text(pick.candidate, served, header))
    print(f"config: {plan.output}  (mobiserve serve --config {plan.output})")
    return 0


def _no_pick(message: str) -> int:
    print(f"mobiserve: error: {message}", file=sys.stderr)
    return 1


def _summary(
    plan: Plan, setup: Setup, seconds: float, tried: int, skipped: list[str], pick: Trial | None
) -> dict[str, Any]:
    return {
        "model": str(plan.served.path),
        "images": f"{len(setup.images)} from {Path(setup.images[0]).parent}",
        "cores": setup.cores,
        "budget_s": plan.seconds,
        "took_s": round(seconds, 1),
        "configurations": tried,
        "stopped_early": f"the budget ran out at stage {skipped[0]!r}" if skipped else "no",
        "target_rate": round(setup.rate, 1),
        "pick": pick.candidate.label if pick else None,
    }


class _Ticker:
    """Moves the progress bar with the clock while measurements block."""

    def __init__(self, bar: Any, started: float):
        self._bar, self._started = bar, started
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tune-progress", daemon=True)

    def say(self, what: str) -> None:
        self._bar.set_description_str(f"tune: {what}", refresh=False)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._bar.n = min(self._bar.total, round(time.monotonic() - self._started))
            self._bar.refresh()

    def __enter__(self) -> _Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._bar.close()
