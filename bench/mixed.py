"""`mobiserve bench --mixed`: latency-sensitive unary calls beside bulk streams, alone and together.

The traffic of a server shared by a backend service and batch clients: one unary caller (one
image per call, `concurrency` in flight) and `streams` ClassifyStream clients, each keeping
`window` messages of `stream_batch` images in flight, every stream on a connection of its own.
Phases, one after the other against the same server, each measured over the same duration:

1. the unary caller alone;
2. the bulk streams alone;
3. both together, each request at its RPC's default priority (unary interactive, streams bulk);
4. the control: both together with the streams' messages marked interactive, so that every image
   shares one lane as if there were no priorities. If it does not show the unary caller waiting
   behind the streams, the benchmark does not measure what it claims to.

The control marks its requests rather than reconfiguring the server, so it needs no second server
and runs against any target. Ratios compare phases of this one run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from mobiserve.bench.loadgen import Load, StepResult, Workload, run_together
from mobiserve.bench.report import Machine, Ratio, plain
from mobiserve.v1 import classifier_pb2 as pb

# the targets this mode is stated against (docs/performance.md)
P50_SLACK_MS = 10.0
P99_SLACK_MS = 30.0
BULK_SHARE = 0.6


@dataclass(frozen=True)
class MixedLoad:
    unary_concurrency: int = 1
    streams: int = 4
    window: int = 16  # messages in flight per stream
    stream_batch: int = 8  # images per stream message
    duration_s: float = 15.0
    warmup_s: float = 3.0


@dataclass(frozen=True)
class Phase:
    name: str
    unary: StepResult | None
    bulk: StepResult | None


@dataclass
class MixedReport:
    started: str
    command: list[str]
    machine: Machine
    target: str
    server: dict[str, Any]
    load: MixedLoad
    phases: list[Phase] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)


def run_mixed(base: Workload, mixed: MixedLoad, cores: int) -> list[Phase]:
    """The four phases against `base.target`; `base` gives the images, model and timeout."""
    from tqdm import tqdm

    unary = dataclasses.replace(base, mode="unary", batch=1, connections=1, priority=0)
    bulk = dataclasses.replace(base, mode="stream", batch=mixed.stream_batch, connections=1, priority=0)
    one_lane = dataclasses.replace(bulk, priority=pb.PRIORITY_INTERACTIVE)
    caller = Load(mixed.unary_concurrency, duration_s=mixed.duration_s, warmup_s=mixed.warmup_s, processes=1)
    streams = dataclasses.replace(caller, concurrency=mixed.streams * mixed.window, processes=mixed.streams)
    phases = []
    for name, parts in (
        ("unary alone", [(unary, caller)]),
        ("bulk alone", [(bulk, streams)]),
        ("together", [(unary, caller), (bulk, streams)]),
        ("together, one lane (control)", [(unary, caller), (one_lane, streams)]),
    ):
        results = iter(run_together(parts, "mobiserve", cores, label=name))
        phase = Phase(
            name,
            next(results) if parts[0][0].mode == "unary" else None,
            next(results) if parts[-1][0].mode == "stream" else None,
        )
        tqdm.write(_line(phase))
        phases.append(phase)
    return phases


def _line(phase: Phase) -> str:
    parts = [f"{phase.name}:"]
    if phase.unary is not None:
        u = phase.unary
        parts.append(f"unary p50 {u.p50_ms:.1f} ms p99 {u.p99_ms:.1f} ms ({u.ok} ok, {sum(u.errors.values())} errors)")
    if phase.bulk is not None:
        b = phase.bulk
        parts.append(f"bulk {b.img_s:.1f} img/s ({b.ok} ok, {sum(b.errors.values())} errors)")
    return " ".join(parts)


def ratios(phases: list[Phase]) -> list[Ratio]:
    by = {p.name: p for p in phases}
    alone, bulk_alone = by["unary alone"].unary, by["bulk alone"].bulk
    together, control = by["together"], by["together, one lane (control)"]
    assert alone is not None and bulk_alone is not None and together.unary and together.bulk and control.unary
    out = []

    def add(name: str, value: float, target: str, met: bool | None) -> None:
        if math.isfinite(value):
            out.append(Ratio(name, round(value, 3), target, met))

    p50, p99 = together.unary.p50_ms - alone.p50_ms, together.unary.p99_ms - alone.p99_ms
    add("unary p50 together - alone (ms)", p50, f"<= +{P50_SLACK_MS:g}", p50 <= P50_SLACK_MS)
    add("unary p99 together - alone (ms)", p99, f"<= +{P99_SLACK_MS:g}", p99 <= P99_SLACK_MS)
    share = together.bulk.img_s / bulk_alone.img_s if bulk_alone.img_s else math.nan
    add("bulk img/s together / alone", share, f">= {BULK_SHARE:g}", share >= BULK_SHARE)
    errors = sum(
        sum(step.errors.values()) for p in phases if p is not control for step in (p.unary, p.bulk) if step is not None
    )
    add("errors (all phases but the control)", errors, "0", errors == 0)
    shown = control.unary.p50_ms - alone.p50_ms
    add("control: unary p50 one lane - alone (ms)", shown, f"> +{P50_SLACK_MS:g} (shows the problem)", None)
    return out


def write(report: MixedReport, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "mixed.json", out / "mixed.txt"]
    paths[0].write_text(json.dumps(plain(dataclasses.asdict(report)), indent=2) + "\n")
    with paths[1].open("w") as f:
        print_table(report, f)
    return paths


def print_table(report: MixedReport, out: TextIO) -> None:
    def p(*parts: object) -> None:
        print(*parts, file=out)

    m, ld = report.machine, report.load
    p(f"mobiserve bench --mixed  {report.started}  target {report.target}")
    p(f"machine: {m.cpu}, {m.cores} cores, load average at start {m.loadavg}")
    if report.server.get("serve_args") is not None:
        p(f"serve args: {report.server['serve_args'] or '(defaults)'}")
    p(
        f"load: 1 unary caller at c={ld.unary_concurrency} (1 image per call) beside {ld.streams} ClassifyStream "
        f"clients x {ld.window} messages of {ld.stream_batch} images in flight; {ld.duration_s:g} s per phase "
        f"after {ld.warmup_s:g} s warm-up"
    )
    p("")
    head = ["phase", "unary p50", "unary p99", "unary req/s", "bulk img/s", "bulk p50", "lanes", "errors"]
    rows = []
    for phase in report.phases:
        u, b = phase.unary, phase.bulk
        lanes = [f"{side}:{'+'.join(s.lanes)}" for side, s in (("u", u), ("b", b)) if s is not None and s.lanes]
        errors = {k: v for s in (u, b) if s is not None for k, v in s.errors.items()}
        rows.append(
            [
                phase.name,
                "-" if u is None else f"{u.p50_ms:.1f} ms",
                "-" if u is None else f"{u.p99_ms:.1f} ms",
                "-" if u is None else f"{u.req_s:.1f}",
                "-" if b is None else f"{b.img_s:.1f}",
                "-" if b is None else f"{b.p50_ms:.0f} ms",
                " ".join(lanes) or "-",
                ",".join(f"{k}={v}" for k, v in errors.items()) or "0",
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    p("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for row in rows:
        p("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    p("lanes: the lanes that served the answers (the responses' timing.lane), u: unary caller, b: streams")
    if report.ratios:
        p("")
        p("against the targets (phases of this one run):")
        for r in report.ratios:
            mark = "" if r.met is None else ("  ok" if r.met else "  SHORT")
            p(f"  {r.name:<44} {r.value:9.2f}   target {r.target}{mark}")
