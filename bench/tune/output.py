"""What `mobiserve tune` writes: the picked configuration as a `serve --config` TOML file, and a
report (table, JSON, plot). Every file is written to a temporary name beside it and renamed into
place, so that an interrupted run leaves each file whole or absent, never half-written."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import tomli_w

from mobiserve.bench.report import Machine, plain
from mobiserve.bench.tune.space import Budget, Candidate, Trial


@dataclass(frozen=True)
class Served:
    """The model every candidate serves."""

    path: Path
    name: str
    synsets: Path | None = None


def config_document(candidate: Candidate, served: Served) -> dict[str, Any]:
    """The candidate as `mobiserve serve --config` reads it (server/config.py's keys)."""
    model: dict[str, Any] = {"name": served.name, "path": str(served.path.resolve())}
    if served.synsets is not None:
        model["synsets"] = str(served.synsets.resolve())
    model |= {
        "max_batch_size": candidate.max_batch_size,
        "max_queue_delay_ms": float(candidate.max_queue_delay_ms),
        "instances": 1,
        "intra_op_threads": candidate.intra_op_threads,
        "lone_threads": candidate.lone_threads,
    }
    return {"server": {"workers": candidate.workers}, "models": [model]}


def config_text(candidate: Candidate, served: Served, header: Sequence[str] = ()) -> str:
    comments = "".join(f"# {line}\n" for line in header)
    return comments + tomli_w.dumps(config_document(candidate, served))


def write_atomic(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def report_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` to write the report into, renamed to `out` at the end of
    the block (replacing an earlier report there); removed if the block fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ report


def rows(trials: Sequence[Trial], budget: Budget, pick: Trial | None) -> list[list[str]]:
    out = []
    for t in trials:
        c = t.candidate
        out.append(
            [
                "*" if t is pick else "",
                str(c.workers),
                str(c.intra_op_threads),
                str(c.lone_threads),
                str(c.max_batch_size),
                f"{c.max_queue_delay_ms:g}",
                _f(t.mean("saturated_img_s"), 1),
                _f(t.mean("saturated_p99_ms"), 1),
                _f(t.mean("lone_p50_ms"), 2),
                _f(t.mean("rate"), 0),
                _f(t.mean("rate_p50_ms"), 2),
                _f(t.mean("rate_p99_ms"), 1),
                str(sum(r.errors for r in t.runs)),
                "yes" if budget.met(t) else "no",
                str(len(t.runs)),
                t.stage,
            ]
        )
    return out


HEAD = [
    "",
    "workers",
    "intra",
    "lone",
    "batch",
    "delay",
    "sat img/s",
    "sat p99",
    "lone p50",
    "rate",
    "rate p50",
    "rate p99",
    "errors",
    "budget",
    "runs",
    "stage",
]


def print_table(trials: Sequence[Trial], budget: Budget, pick: Trial | None, out: IO[str]) -> None:
    table = rows(trials, budget, pick)
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h) for i, h in enumerate(HEAD)]
    print("  ".join(h.rjust(w) for h, w in zip(HEAD, widths)), file=out)
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)), file=out)
    limits = [
        f"p50 <= {budget.p50_ms:g} ms" if budget.p50_ms else "",
        f"p99 <= {budget.p99_ms:g} ms" if budget.p99_ms else "",
    ]
    print(
        "intra/lone: intra-op threads per worker under load / for lone requests; latencies in ms; sat: closed loop "
        "that keeps every core busy; rate: open loop at that many images/s; budget: "
        + (", ".join(x for x in limits if x) or "none given (throughput only)")
        + "; runs: measurements averaged",
        file=out,
    )


def write_report(
    folder: Path,
    trials: Sequence[Trial],
    budget: Budget,
    pick: Trial | None,
    summary: dict[str, Any],
    machine: Machine,
) -> list[Path]:
    """tune.txt, tune.json and tune.png (when matplotlib is there) into `folder`."""
    paths = [folder / "tune.txt", folder / "tune.json"]
    with paths[0].open("w") as f:
        for key, value in summary.items():
            print(f"{key}: {value}", file=f)
        print(file=f)
        print_table(trials, budget, pick, f)
    document = {
        "summary": summary,
        "machine": dataclasses.asdict(machine),
        "budget": dataclasses.asdict(budget),
        "pick": dataclasses.asdict(pick.candidate) if pick else None,
        "trials": [
            {
                "candidate": dataclasses.asdict(t.candidate),
                "stage": t.stage,
                "runs": [dataclasses.asdict(r) for r in t.runs],
            }
            for t in trials
        ],
    }
    paths[1].write_text(json.dumps(plain(document), indent=2) + "\n")
    png = folder / "tune.png"
    if write_plot(trials, budget, pick, machine, png):
        paths.append(png)
    return paths


def write_plot(trials: Sequence[Trial], budget: Budget, pick: Trial | None, machine: Machine, path: Path) -> bool:
    """Saturated throughput against lone-request p50 and open-loop p99, one point per configuration."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110, sharex=True)
    for ax, name, title, limit in (
        (axes[0], "lone_p50_ms", "lone request p50 (ms)", budget.p50_ms),
        (axes[1], "rate_p99_ms", "p99 at the target rate (ms)", budget.p99_ms),
    ):
        for t in trials:
            met = budget.met(t)
            x, y = t.mean("saturated_img_s"), t.mean(name)
            ax.plot(x, y, "*" if t is pick else "o", ms=14 if t is pick else 6, color="tab:green" if met else "tab:red")
            c = t.candidate
            tag = f"{c.workers}x{c.intra_op_threads} l{c.lone_threads} b{c.max_batch_size} d{c.max_queue_delay_ms:g}"
            ax.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
        if limit:
            ax.axhline(limit, color="grey", linestyle=":", label="budget")
            ax.legend(fontsize=7)
        ax.set_xlabel("saturated throughput (images/s)")
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
    fig.suptitle(
        f"mobiserve tune: {machine.cpu}, {machine.cores} cores (star: the pick; green: within the budget)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _f(value: float, digits: int) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"
