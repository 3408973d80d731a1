"""`mobiserve bench` end to end: tiny, bounded sweeps against real servers on 127.0.0.1.

The harness runs as a user runs it (a `mobiserve bench` process, awaited so that the in-process
server fixture keeps serving); the tests check that its reports are complete and consistent,
never how fast anything is.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from mobiserve.bench.cpu import ROLES, py_spy, role_of, snapshot
from mobiserve.bench.servers import unbatched_server
from mobiserve.server.app import App
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import INT8, model_config, request_of, start_server

pytestmark = pytest.mark.slow  # real processes or whole-sample sweeps

MOBISERVE = str(Path(sys.executable).parent / "mobiserve")


@pytest_asyncio.fixture(scope="module")
async def naming_server(int8_model: Path) -> AsyncIterator[App]:
    """The harness's comparisons load the served model file: a server that names it in full."""
    app = await start_server(model_config(int8_model, max_batch_size=32), expose_model_paths=True)
    yield app
    await app.stop(grace_s=5)


@pytest.fixture(scope="module")
def few_images(tmp_path_factory: pytest.TempPathFactory, sample_images: list[Path]) -> Path:
    """16 of the sample images, linked (not copied) into a folder of their own: quick to load."""
    folder = tmp_path_factory.mktemp("images")
    for image in sample_images[:16]:
        (folder / image.name).symlink_to(image)
    return folder


async def bench(*args: str, timeout: float = 300) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        MOBISERVE, "bench", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def outputs(folder: Path) -> tuple[dict[str, Any], list[dict[str, str]]]:
    assert (folder / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "p99" in (folder / "bench.txt").read_text()
    with (folder / "bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    return json.loads((folder / "bench.json").read_text()), rows


def check_step(step: dict[str, Any], requests: int | None = None) -> None:
    """Counts add up, nothing failed, figures are ordered as percentiles must be."""
    if requests is not None:
        assert step["requests"] == requests
    assert step["ok"] == step["requests"] > 0 and step["errors"] == {}
    assert step["images"] == step["ok"] * step["batch"]
    assert step["img_s"] == pytest.approx(step["req_s"] * step["batch"], rel=1e-3)
    assert 0 < step["p50_ms"] <= step["p90_ms"] <= step["p95_ms"] <= step["p99_ms"] <= step["max_ms"]
    assert step["batch_size"] >= step["batch"] and step["inference_ms"] > 0
    assert step["client_cpu_s"] > 0


async def test_closed_loop_sweep_with_baseline_writes_consistent_reports(
    naming_server: App, few_images: Path, tmp_path: Path
) -> None:
    code, out, err = await bench(
        "--target",
        f"127.0.0.1:{naming_server.port}",
        "--concurrency",
        "1,4",
        "--requests",
        "20",
        "--warmup",
        "0.2",
        "--images",
        str(few_images),
        "--client-processes",
        "2",
        "--baseline",
        "--baseline-seconds",
        "0.3",
        "--output",
        str(tmp_path),
    )
    assert code == 0, err
    report, rows = outputs(tmp_path)
    assert [s["concurrency"] for s in report["steps"]] == [1, 4]
    assert [s["processes"] for s in report["steps"]] == [1, 2]
    for step in report["steps"]:
        check_step(step, requests=20)
    assert report["machine"]["cores"] >= 1 and report["machine"]["onnxruntime"]
    assert report["server"]["path"] == str(INT8)
    baseline = report["baseline"]
    assert min(baseline["card_img_s"], baseline["own_img_s"], baseline["ort_best_img_s"]) > 0
    assert baseline["card_latency_ms"] > 0 and baseline["own_latency_ms"] > 0
    assert report["preprocess"]["images"] == 16
    names = [r["name"] for r in report["ratios"]]
    assert any("card's Pillow pipeline" in n for n in names) and any("c=1 p50" in n for n in names)
    assert [int(r["ok"]) for r in rows] == [20, 20] and all(float(r["x_card"]) > 0 for r in rows)
    assert "mobiserve" in out and "ratios" in out


async def test_mixed_traffic_reports_both_sides_of_each_phase_and_the_lanes_that_served_them(
    naming_server: App, few_images: Path, tmp_path: Path
) -> None:
    code, out, err = await bench(
        "--mixed",
        "--target",
        f"127.0.0.1:{naming_server.port}",
        "--streams",
        "2",
        "--window",
        "2",
        "--stream-batch",
        "2",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--images",
        str(few_images),
        "--output",
        str(tmp_path),
    )
    assert code == 0, err
    report = json.loads((tmp_path / "mixed.json").read_text())
    phases = {p["name"]: p for p in report["phases"]}
    assert list(phases) == ["unary alone", "bulk alone", "together", "together, one lane (control)"]
    assert phases["unary alone"]["bulk"] is None and phases["bulk alone"]["unary"] is None
    for phase in report["phases"]:
        for side, lanes in (("unary", {"interactive"}), ("bulk", {"bulk"})):
            step = phase[side]
            if step is None:
                continue
            assert step["ok"] > 0 and step["errors"] == {}
            # the control marks the streams' messages interactive: everything in one lane
            control = phase["name"].endswith("(control)") and side == "bulk"
            assert set(step["lanes"]) == ({"interactive"} if control else lanes), phase["name"]
    assert phases["bulk alone"]["bulk"]["batch"] == 2 and phases["bulk alone"]["bulk"]["processes"] == 2
    assert [r["name"] for r in report["ratios"]][:3] == [
        "unary p50 together - alone (ms)",
        "unary p99 together - alone (ms)",
        "bulk img/s together / alone",
    ]
    assert "together, one lane (control)" in out and "against the targets" in out


async def test_open_loop_stream_of_tensors_is_bounded_and_compares_with_unbatched(
    naming_server: App, few_images: Path, tmp_path: Path
) -> None:
    code, out, err = await bench(
        "--target",
        f"127.0.0.1:{naming_server.port}",
        "--rate",
        "15",
        "--duration",
        "1.5",
        "--warmup",
        "0.3",
        "--mode",
        "stream",
        "--tensor",
        "--batch",
        "2",
        "--client-processes",
        "1",
        "--compare-unbatched",
        "--images",
        str(few_images),
        "--output",
        str(tmp_path),
    )
    assert code == 0, err
    report, rows = outputs(tmp_path)
    (step,), (unbatched,) = report["steps"], report["unbatched"]
    for s in (step, unbatched):
        check_step(s)
        assert (s["loop"], s["mode"], s["inputs"], s["rate"], s["window_s"]) == ("open", "stream", "tensor", 15, 1.5)
    assert unbatched["server"] == "unbatched" and unbatched["server_cpu_pct"] is not None
    assert [r["server"] for r in rows] == ["mobiserve", "unbatched"] and float(rows[0]["x_unbatched"]) > 0


async def test_unbatched_server_answers_like_the_real_server(
    stub: pb_grpc.ClassifierStub, jpeg: bytes, tmp_path: Path
) -> None:
    stack = ExitStack()
    managed = await asyncio.to_thread(stack.enter_context, unbatched_server(str(INT8), tmp_path / "unbatched.log"))
    try:
        async with grpc.aio.insecure_channel(managed.target) as channel:
            plain = pb_grpc.ClassifierStub(channel)
            expected = await stub.Classify(request_of(jpeg, top_k=5), timeout=60)
            got = await plain.Classify(request_of(jpeg, top_k=5), timeout=60)
            assert got.results[0].classes[0].index == expected.results[0].classes[0].index
            assert len(got.results[0].classes) == 5 and got.timing.batch_size == 1

            call = plain.ClassifyStream(timeout=60)
            await call.write(request_of(jpeg, request_id="a"))
            await call.write(request_of(b"not an image", request_id="b"))
            await call.done_writing()
            answers = {r.request_id: r async for r in call}
            assert answers["a"].results[0].classes[0].index == expected.results[0].classes[0].index
            assert answers["b"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert "image 0" in answers["b"].error.message

            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await plain.Classify(request_of(b"not an image"), timeout=60)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await asyncio.to_thread(stack.close)


async def test_cost_report_splits_a_started_servers_cpu_by_thread_role(few_images: Path, tmp_path: Path) -> None:
    """The per-image cost instrument on a server the harness starts: every role the server has is
    there, the roles add up to the process's own total, and the in-process pipelines get the same."""
    code, out, err = await bench(
        "--serve",
        f"--model {INT8}",
        "--concurrency",
        "8",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--images",
        str(few_images),
        "--baseline",
        "--baseline-seconds",
        "1",
        *(["--gil"] if py_spy() else []),
        "--output",
        str(tmp_path),
    )
    assert code == 0, err
    report, rows = outputs(tmp_path)
    (step,) = report["steps"]
    check_step(step)
    roles = step["cpu_roles_ms_img"]
    assert set(roles) == set(ROLES)
    for role in ("loop", "preprocess", "inference", "onnxruntime", "grpc"):
        assert roles[role] > 0, (role, roles)
    # the roles are the process's total, split: equal but for rounding
    assert sum(roles.values()) == pytest.approx(step["cpu_ms_img"], abs=0.02)
    assert roles["other"] < 0.2 * step["cpu_ms_img"]  # every busy thread has a role
    # the CPU per image agrees with the CPU share of the cores over the window
    cores = report["machine"]["cores"]
    busy_s = step["server_cpu_pct"] / 100 * cores * step["window_s"]
    assert step["cpu_ms_img"] * step["images"] / 1000 == pytest.approx(busy_s, rel=0.1)
    assert float(rows[0]["cpu_ms_img_preprocess"]) == roles["preprocess"]
    for name in ("card_cpu", "own_cpu"):
        pipeline = report["baseline"][name]
        assert pipeline["cpu_roles_ms_img"]["preprocess"] > 0 and pipeline["cpu_roles_ms_img"]["onnxruntime"] > 0
        assert sum(pipeline["cpu_roles_ms_img"].values()) == pytest.approx(pipeline["cpu_ms_img"], abs=0.02)
    assert report["baseline"]["own_cpu"]["cpu_roles_ms_img"]["inference"] > 0
    assert all(ms > 0 for ms in report["baseline"]["ort_cpu_ms"].values())
    if py_spy():
        assert 0 < step["gil_pct"] < 100 and step["gil_ms_img"] > 0
        assert step["gil_roles_ms_img"]["loop"] > 0
        assert sum(step["gil_roles_ms_img"].values()) == pytest.approx(step["gil_ms_img"], abs=0.02)
        assert report["baseline"]["own_cpu"]["gil_ms_img"] > 0
    assert "ms of CPU per image by thread role" in out


async def test_a_servers_threads_are_named_by_role(server: App, stub: pb_grpc.ClassifierStub, jpeg: bytes) -> None:
    """The OS names the report classifies by (top -H shows the same)."""
    await asyncio.gather(*(stub.Classify(request_of(jpeg), timeout=60) for _ in range(8)))
    shot = snapshot(os.getpid())
    assert shot is not None
    found = {role_of(name, tid, os.getpid()) for tid, (name, _, _) in shot.threads.items()}
    assert {"loop", "preprocess", "inference", "onnxruntime", "grpc"} <= found


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--images", "/nonexistent"], "is not a folder"),
        (["--concurrency", "0,4"], "--concurrency values must be positive"),
        (["--baseline", "--target", "192.0.2.1:50051"], "must be 127.0.0.1 or localhost"),
        (["--target", "127.0.0.1:1"], "cannot list 127.0.0.1:1's models: UNAVAILABLE"),
    ],
)
async def test_bad_usage_is_one_clear_line(args: list[str], message: str, few_images: Path, tmp_path: Path) -> None:
    code, out, err = await bench("--images", str(few_images), *args, "--output", str(tmp_path), timeout=120)
    assert code == 1
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "bench.json").exists()
