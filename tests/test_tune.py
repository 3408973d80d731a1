"""`mobiserve tune`: the search's pure parts, its argument errors, a real run on a tiny budget
against real servers on 127.0.0.1 that writes a config `serve --config` takes, and an interrupted
run that leaves nothing behind. Nothing here checks how fast anything is."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mobiserve.bench.tune.space import (
    Budget,
    Candidate,
    Figures,
    Trial,
    batch_options,
    delay_options,
    layouts,
    lone_options,
    ranked,
)
from mobiserve.client import Client
from mobiserve.server.config import load_toml

from helpers import INT8, SYNSETS, require, run, serve

MOBISERVE = str(Path(sys.executable).parent / "mobiserve")


def figures(img_s: float, lone_p50: float = 5.0, p99: float = 50.0, errors: int = 0) -> Figures:
    return Figures(lone_p50, img_s, p99, lone_p50, p99, errors, rate=100.0)


def trial(img_s: float, **kw: float) -> Trial:
    return Trial(Candidate(1, 1, 1, max_batch_size=int(img_s)), "split", [figures(img_s, **kw)])  # type: ignore[arg-type]


def test_the_splits_cover_the_cores_with_the_servers_default_first() -> None:
    assert layouts(2) == [Candidate(2, 1, 2), Candidate(1, 2, 2)]
    sixteen = layouts(16)
    assert sixteen[0] == Candidate(16, 1, 4)  # one worker per core, lone requests on 4 threads
    assert {(c.workers, c.intra_op_threads) for c in sixteen} == {(16, 1), (1, 16), (2, 8), (4, 4), (8, 2)}
    assert all(c.workers * c.intra_op_threads == 16 and c.lone_threads >= c.intra_op_threads for c in sixteen)
    assert [c.lone_threads for c in lone_options(Candidate(16, 1, 4), 16)] == [1, 2, 4, 8]
    assert [c.max_batch_size for c in batch_options(Candidate(2, 1, 2))] == [8, 16, 32, 64]
    assert [c.max_queue_delay_ms for c in delay_options(Candidate(2, 1, 2))] == [0, 1, 2, 5]


def test_the_pick_is_the_fastest_within_the_budget() -> None:
    fast_but_slow_tail, slower, slowest, failing = trial(300, p99=400), trial(250), trial(200), trial(500, errors=1)
    budget = Budget(p99_ms=100)
    order = ranked([slowest, fast_but_slow_tail, failing, slower], budget)
    assert order[:2] == [slower, slowest]  # within the budget: by throughput
    assert order[2] is fast_but_slow_tail and order[3] is failing  # over it: nearest first; errors last
    assert ranked([slowest, fast_but_slow_tail], Budget())[0] is fast_but_slow_tail  # no budget: throughput
    assert not Budget(p50_ms=1).met(slower)  # the lone request's median counts against --p50-ms
    two_runs = Trial(Candidate(1, 1, 1), "final", [figures(100), figures(300)])
    assert two_runs.mean("saturated_img_s") == 200 and math.isnan(Trial(Candidate(1, 1, 1), "x").mean("rate"))


@pytest.fixture(scope="module")
def few_images(tmp_path_factory: pytest.TempPathFactory, sample_images: list[Path]) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for image in sample_images[:24]:
        (folder / image.name).symlink_to(image)
    return folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "0"], "--budget must be positive"),
        (["--budget", "10"], "--budget 10 s is too short"),
        (["--p99-ms", "-5"], "--p99-ms must be positive"),
        (["--rate", "0"], "--rate must be positive"),
        (["--model", "/nonexistent/model.onnx"], "model file not found: /nonexistent/model.onnx"),
        (["--images", "/nonexistent"], "--images: /nonexistent is not a folder"),
        (["--images", "EMPTY"], "no image files"),
        (["--output", "EMPTY"], "is a folder"),
    ],
)
def test_bad_arguments_are_one_clear_line_and_exit_2(
    args: list[str], message: str, tmp_path: Path, few_images: Path
) -> None:
    (tmp_path / "empty").mkdir()
    given = {"--model": str(require(INT8)), "--images": str(few_images), "--output": str(tmp_path / "out.toml")}
    given |= dict(zip(args[::2], (str(tmp_path / "empty") if a == "EMPTY" else a for a in args[1::2])))
    result = run("tune", *(x for pair in given.items() for x in pair), cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # nothing written


# Ctrl-C's default action for the command, even when this suite runs in the background: a shell
# starts background jobs with SIGINT ignored, the ignoring is inherited, and Python then installs
# no KeyboardInterrupt handler, so a tune started from here would not see the test's Ctrl-C.
CTRL_C_ON = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"


def tune(*args: str, cwd: Path) -> subprocess.Popen[str]:
    command = [MOBISERVE, "tune", "--model", str(require(INT8)), "--synsets", str(require(SYNSETS)), *args]
    return subprocess.Popen(
        [sys.executable, "-c", CTRL_C_ON, *command],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_a_tiny_budget_run_writes_a_config_serve_takes_as_is(tmp_path: Path, few_images: Path, jpeg: bytes) -> None:
    proc = tune("--images", str(few_images), "--budget", "60", "--output", "tuned.toml", "--report", "r", cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    config = load_toml(tmp_path / "tuned.toml")
    (model,) = config.models
    assert model.path == str(require(INT8)) and model.name == "mobilenetv2-12-int8"
    picked = Candidate(
        config.workers, model.intra_op_threads, model.lone_threads, model.max_batch_size, model.max_queue_delay_ms
    )
    report = json.loads((tmp_path / "r" / "tune.json").read_text())
    measured = [Candidate(**t["candidate"]) for t in report["trials"] if t["runs"]]
    assert measured and picked == measured[0] == Candidate(**report["pick"])  # the best of what it measured
    assert {p.name for p in (tmp_path / "r").iterdir()} >= {"tune.txt", "tune.json"}
    assert "sat img/s" in out and "config: tuned.toml" in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    server = serve("--config", str(tmp_path / "tuned.toml"))
    try:
        with Client(server.target) as client:
            assert client.classify(jpeg).top.wnid == "n01440764"
    finally:
        server.stop()


@pytest.mark.slow
def test_an_interrupted_run_writes_nothing_and_leaves_no_server(tmp_path: Path, few_images: Path) -> None:
    proc = tune("--images", str(few_images), "--budget", "300", "--output", "tuned.toml", "--report", "r", cwd=tmp_path)
    measuring = threading.Event()
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "img/s saturated" in line:  # one configuration measured: the run is well under way
                measuring.set()
        measuring.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert measuring.wait(240), "".join(lines)
    children = _children(proc.pid)
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        stacks = _stacks(proc.pid)
        proc.kill()
        pytest.fail(f"tune still running 120 s after Ctrl-C; its threads:\n{stacks}\nits log:\n{''.join(lines)}")
    reader.join(30)
    assert proc.returncode == 130, "".join(lines)
    assert "interrupted; nothing written" in "".join(lines)
    assert list(tmp_path.iterdir()) == []  # no config, no report, no temporary files
    end = time.monotonic() + 60  # helpers (multiprocessing's resource tracker) exit once their pipe closes
    while (left := [pid for pid in children if _alive(pid)]) and time.monotonic() < end:
        time.sleep(0.1)
    assert not left, left  # no server, worker or load process outlives the run


def _stacks(pid: int) -> str:
    """Where a process's threads are (py-spy, from the dev extra), to tell a hang's cause."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.is_file():
        return "(py-spy is not installed)"
    done = subprocess.run([str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def _children(pid: int) -> list[int]:
    """pid's descendants now (the server it runs, the server's workers, load processes)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").iterdir():
            kids = [int(k) for k in (task / "children").read_text().split()]
            found += kids
            todo += kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"
