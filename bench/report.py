"""The bench report: machine, settings, steps, baselines and ratios -> terminal table, JSON, CSV, PNG."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from mobiserve.bench.baseline import CARD_BATCH, Baseline, PipelineCost, PreprocessReport
from mobiserve.bench.cpu import ROLES
from mobiserve.bench.loadgen import StepResult
from mobiserve.server.cores import available_cores

REFERENCE_CONCURRENCY = 32  # where the throughput targets are stated


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int  # usable by this process
    logical_cpus: int
    onnxruntime: str
    grpcio: str
    python: str
    platform: str
    loadavg: tuple[float, float, float] | None  # at the start: a busy machine shows here


@dataclass(frozen=True)
class Ratio:
    name: str
    value: float
    target: str  # the target, for the reader; nothing is asserted
    met: bool | None


@dataclass
class Report:
    started: str
    command: list[str]
    machine: Machine
    target: str
    server: dict[str, Any]  # ListModels' entry for the measured model, plus the --serve arguments
    settings: dict[str, Any]
    steps: list[StepResult] = field(default_factory=list)
    unbatched: list[StepResult] = field(default_factory=list)
    baseline: Baseline | None = None
    preprocess: PreprocessReport | None = None
    ratios: list[Ratio] = field(default_factory=list)


def machine() -> Machine:
    import grpc
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return Machine(
        cpu=cpu,
        cores=available_cores(),
        logical_cpus=os.cpu_count() or 1,
        onnxruntime=onnxruntime.__version__,
        grpcio=grpc.__version__,
        python=platform.python_version(),
        platform=platform.platform(terse=True),
        loadavg=_loadavg(),
    )


def _loadavg() -> tuple[float, float, float] | None:
    if not hasattr(os, "getloadavg"):
        return None
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


# ------------------------------------------------------------------------------------------ ratios


def step_ratios(step: StepResult, report: Report) -> dict[str, float | None]:
    """This step's throughput against the in-process references and the unbatched server."""
    b = report.baseline
    unbatched = next((u for u in report.unbatched if (u.concurrency, u.rate) == (step.concurrency, step.rate)), None)
    jpeg, tensor = (b if step.inputs == "jpeg" else None), (b if step.inputs == "tensor" else None)
    return {
        "x_card": _ratio(step.img_s, jpeg.card_img_s if jpeg else None),
        "x_own": _ratio(step.img_s, jpeg.own_img_s if jpeg else None),
        "x_ort": _ratio(step.img_s, tensor.ort_best_img_s if tensor else None),
        "x_unbatched": _ratio(step.img_s, unbatched.img_s if unbatched else None),
    }


def _ratio(value: float, reference: float | None) -> float | None:
    return value / reference if reference else None


def headline_ratios(report: Report) -> list[Ratio]:
    """The targets, at concurrency 32 (else the highest measured) and 1."""
    out: list[Ratio] = []

    def add(name: str, value: float | None, target: str, met: bool | None) -> None:
        if value is not None and math.isfinite(value):
            out.append(Ratio(name, round(value, 3), target, met))

    closed = [s for s in report.steps if s.loop == "closed"]
    b = report.baseline
    if closed:
        top = next(
            (s for s in closed if s.concurrency == REFERENCE_CONCURRENCY), max(closed, key=lambda s: s.concurrency)
        )
        r = step_ratios(top, report)
        c = f"c={top.concurrency}"
        for key, name, floor in (
            ("x_card", "card's Pillow pipeline in-process", 1.3),
            ("x_own", "mobiserve's pipeline in-process", 0.9),
            ("x_ort", "onnxruntime's best batch in-process (tensors)", 0.9),
            ("x_unbatched", "the unbatched server", 1.2),
        ):
            value = r[key]
            add(f"{c} img/s / {name}", value, f">= {floor:g}", value is not None and value >= floor)
        add(f"{c} p99 / p50", top.p99_ms / top.p50_ms, "<= 3", top.p99_ms <= 3 * top.p50_ms)
        one = next((s for s in closed if s.concurrency == 1 and s.inputs == "jpeg" and s.batch == 1), None)
        if one is not None and b is not None:
            for name, latency in (("card's", b.card_latency_ms), ("mobiserve's", b.own_latency_ms)):
                add(
                    f"c=1 p50 - {name} single-image latency in-process (ms)",
                    one.p50_ms - latency,
                    "<= +1",
                    one.p50_ms <= latency + 1,
                )
    errors = sum(sum(s.errors.values()) for s in report.steps)
    add("errors, all steps", errors, "0", errors == 0)
    if report.preprocess is not None:
        add(
            "preprocessing ms/image: card's Pillow / mobiserve's",
            report.preprocess.speedup,
            "as high as possible",
            None,
        )
    return out


# ------------------------------------------------------------------------------------------ output


def write_all(report: Report, out: Path) -> list[Path]:
    """bench.json, bench.csv, bench.txt (the table) and bench.png (when matplotlib is there)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.csv", out / "bench.txt"]
    paths[0].write_text(json.dumps(plain(dataclasses.asdict(report)), indent=2) + "\n")
    write_csv(report, paths[1])
    with paths[2].open("w") as f:
        print_table(report, f)
    png = out / "bench.png"
    if write_plot(report, png):
        paths.append(png)
    return paths


def plain(value: Any) -> Any:
    """JSON has no NaN: unknown figures become null; dict keys become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


_ROLE_COLUMNS = ("cpu_roles_ms_img", "gil_roles_ms_img")  # one CSV column per role: cpu_ms_img_loop, ...


def write_csv(report: Report, path: Path) -> None:
    names = [f.name for f in dataclasses.fields(StepResult) if f.name not in _ROLE_COLUMNS]
    roles = [f"{kind}_ms_img_{role}" for kind in ("cpu", "gil") for role in ROLES]
    extra = ["x_card", "x_own", "x_ort", "x_unbatched"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names + roles + extra)
        writer.writeheader()
        for step in report.steps + report.unbatched:
            row = dataclasses.asdict(step)
            row["errors"] = ";".join(f"{k}={v}" for k, v in step.errors.items())
            row["lanes"] = ";".join(f"{k}={v}" for k, v in step.lanes.items())
            for kind, column in zip(("cpu", "gil"), _ROLE_COLUMNS):
                for role, ms in row.pop(column).items():
                    row[f"{kind}_ms_img_{role}"] = ms
            ratios = step_ratios(step, report) if step.server != "unbatched" else {}
            writer.writerow(row | {k: "" if (v := ratios.get(k)) is None else round(v, 4) for k in extra})


def write_plot(report: Report, path: Path) -> bool:
    """Latency (p50, p99) against throughput, one line per server; in-process references as verticals."""
    try:
        import matplotlib
    except ImportError:
        print("mobiserve bench: matplotlib is not installed (pip install 'mobiserve[bench]'): no plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for steps, color in ((report.steps, "tab:blue"), (report.unbatched, "tab:orange")):
        if not steps:
            continue
        x = [s.img_s for s in steps]
        name = steps[0].server
        ax.plot(x, [s.p50_ms for s in steps], "o-", color=color, label=f"{name} p50")
        ax.plot(x, [s.p99_ms for s in steps], "s--", color=color, label=f"{name} p99")
        for s in steps:
            ax.annotate(_load_label(s), (s.img_s, s.p50_ms), textcoords="offset points", xytext=(4, -10), fontsize=7)
    b = report.baseline
    if b is not None:
        ax.axvline(b.card_img_s, color="grey", linestyle=":", label=f"card's Pillow in-process {b.card_img_s:.0f}")
        ax.axvline(b.own_img_s, color="black", linestyle=":", label=f"mobiserve in-process {b.own_img_s:.0f}")
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    m = report.machine
    ax.set_title(f"mobiserve bench: {m.cpu}, {m.cores} cores, onnxruntime {m.onnxruntime}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _load_label(step: StepResult) -> str:
    return f"c={step.concurrency}" if step.loop == "closed" else f"{step.rate:g}/s"


def print_table(report: Report, out: TextIO) -> None:
    m, s = report.machine, report.settings

    def p(*parts: object) -> None:
        print(*parts, file=out)

    p(f"mobiserve bench  {report.started}  target {report.target}")
    p(
        f"machine: {m.cpu}, {m.cores} cores, onnxruntime {m.onnxruntime}, grpcio {m.grpcio}, "
        f"python {m.python}, load average at start {m.loadavg}"
    )
    srv = report.server
    if srv.get("name"):
        p(
            f"server: model {srv['name']} ({srv.get('path')}), max batch {srv.get('max_batch_size')}, "
            f"queue delay {srv.get('max_queue_delay_ms')} ms, {srv.get('instances')} instance(s) x "
            f"{srv.get('intra_op_threads')} intra-op threads"
            + (f"; serve args: {srv['serve_args']}" if srv.get("serve_args") else "")
        )
    measure = f"{s['duration_s']:g} s" if s.get("duration_s") else f"{s['requests']} requests"
    p(
        f"load: {s['loop']} loop, {s['mode']}, {s['inputs']}, {s['batch']} image(s)/request, "
        f"{measure} per step after {s['warmup_s']:g} s warm-up"
    )
    p("")
    head = [
        "server",
        "load",
        "proc",
        "req/s",
        "img/s",
        "p50",
        "p90",
        "p95",
        "p99",
        "max",
        "queue",
        "prep",
        "infer",
        "batch",
        "cli cpu",
        "srv cpu",
        "x card",
        "x own",
        "x ort",
        "x unb",
        "errors",
    ]
    rows = []
    for st in report.steps + report.unbatched:
        r = step_ratios(st, report) if st.server != "unbatched" else {}
        rows.append(
            [
                st.server,
                _load_label(st),
                str(st.processes),
                f"{st.req_s:.1f}",
                f"{st.img_s:.1f}",
                *(
                    _ms(v)
                    for v in (
                        st.p50_ms,
                        st.p90_ms,
                        st.p95_ms,
                        st.p99_ms,
                        st.max_ms,
                        st.queue_ms,
                        st.preprocess_ms,
                        st.inference_ms,
                    )
                ),
                _num(st.batch_size, 1),
                f"{st.client_cpu_pct:.0f}%",
                "-" if st.server_cpu_pct is None else f"{st.server_cpu_pct:.0f}%",
                *(_num(r.get(k), 2) for k in ("x_card", "x_own", "x_ort", "x_unbatched")),
                ",".join(f"{k}={v}" for k, v in st.errors.items()) or "0",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    p("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for row in rows:
        p("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    p("latencies in ms; queue/prep/infer/batch: server-side means from `timing`; cpu: % of window x cores")
    b = report.baseline
    if b is not None:
        p("")
        p(f"in-process, no gRPC ({b.seconds:g} s each, {b.threads} threads):")
        lines = [
            (
                f"card's Pillow pipeline, batches of {CARD_BATCH}",
                b.card_img_s,
                f"single image {b.card_latency_ms:.2f} ms",
            ),
            (f"mobiserve's pipeline, batches of {b.own_batch}", b.own_img_s, f"single image {b.own_latency_ms:.2f} ms"),
            (
                f"onnxruntime on ready tensors, best: batch {b.ort_best_batch}",
                b.ort_best_img_s,
                " ".join(f"b{k}={v:.0f}" for k, v in b.ort_img_s.items()),
            ),
        ]
        for name, img_s, note in lines:
            p(f"  {name:<46} {img_s:8.1f} img/s   {note}")
    _print_costs(report, p)
    pre = report.preprocess
    if pre is not None:
        p("")
        p(
            f"preprocessing, ms/image (median of {pre.images} images, one thread): card's Pillow {pre.card_ms:.2f}; "
            f"mobiserve {pre.own_total_ms:.2f} = decode+crop {pre.own_ms:.2f} + normalise {pre.normalize_ms:.2f}; "
            f"{pre.speedup:.2f}x"
        )
    if report.ratios:
        p("")
        p("ratios against the targets (compare only figures from the same run):")
        for ratio in report.ratios:
            mark = "" if ratio.met is None else ("  ok" if ratio.met else "  SHORT")
            p(f"  {ratio.name:<62} {ratio.value:9.3f}   target {ratio.target}{mark}")


def _print_costs(report: Report, p: Callable[..., None]) -> None:
    """ms of CPU per image by thread role (and GIL ms per image), servers and in-process alike."""
    rows: list[tuple[str, str, PipelineCost | StepResult]] = [
        (st.server, _load_label(st), st) for st in report.steps + report.unbatched if st.cpu_ms_img is not None
    ]
    b = report.baseline
    if b is not None:
        rows += [(name, "in-process", c) for name, c in (("card", b.card_cpu), ("own", b.own_cpu)) if c is not None]
    if not rows:
        return
    gil = any(c.gil_ms_img is not None for _, _, c in rows)
    head = ["", "load", "total", *ROLES] + (
        ["gil", "gil %", *(f"gil {r}" for r in ("loop", "preprocess"))] if gil else []
    )
    table = []
    for name, load, c in rows:
        cells = [name, load, _num(c.cpu_ms_img, 2), *(_num(c.cpu_roles_ms_img.get(r), 2) for r in ROLES)]
        if gil:
            cells += [_num(c.gil_ms_img, 2), _num(c.gil_pct, 1)]
            cells += [_num(c.gil_roles_ms_img.get(r), 2) for r in ("loop", "preprocess")]
        table.append(cells)
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(head)]
    p("")
    p(
        "ms of CPU per image by thread role (/proc/<pid>/task, over the measured window)"
        + ("; GIL held, ms per image (py-spy --gil)" if gil else "")
    )
    p("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for cells in table:
        p("  ".join(cell.rjust(w) for cell, w in zip(cells, widths)))
    if b is not None and b.ort_cpu_ms:
        p(
            "onnxruntime alone on ready tensors, ms of CPU per image: "
            + " ".join(f"b{k}={v:.2f}" for k, v in b.ort_cpu_ms.items())
        )


def _ms(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"
