"""Locust against a real server: examples/locustfile.py run headless, as a user runs it.

Locust runs as a child process (importing it would monkey-patch this one). Whether its users
overlap is made a matter of structure, not of machine speed: the server is reached through a
link that delivers every byte DELAY seconds late, so each call takes at least 2 * DELAY, and a
client making one call at a time cannot pass 1 / (2 * DELAY) calls per second however fast the
machine, over any window that holds its calls whole (here: from launching Locust to its last
answer). Users that really overlap pass it many times over.
(A locustfile without the gevent hook stays under it: docs/load-testing.md has the figures.)
"""

from __future__ import annotations

import asyncio
import csv
import importlib.metadata
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mobiserve.server.app import App

from helpers import SAMPLE, require

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "locustfile.py"
LOCUST = str(Path(sys.executable).parent / "locust")
DELAY = 0.1  # seconds, each way


@dataclass
class Run:
    code: int
    log: str
    launched: float  # time.time() just before Locust was started
    stats: dict[str, dict[str, Any]]  # by name: Locust's final statistics (--json-file)
    failures: list[dict[str, str]]  # Locust's failures table (--csv)

    def rate(self, name: str) -> float:
        """Calls/s from launching Locust to its last answer: a window holding every call whole."""
        entry = self.stats[name]
        return float(entry["num_requests"] / (entry["last_request_timestamp"] - self.launched))

    def requests(self, name: str) -> int:
        return int(self.stats[name]["num_requests"])

    def failed(self, name: str) -> int:
        return int(self.stats[name]["num_failures"])

    def response_bytes(self, name: str) -> int:
        return int(self.stats[name]["total_content_length"])


async def locust(
    locustfile: Path, target: str, tmp: Path, *args: str, users: int = 1, seconds: int = 2, images: Path | None = SAMPLE
) -> Run:
    """`locust -f LOCUSTFILE --headless --csv` for `seconds`, all users started at once.

    The counts come from --json-file, written as Locust exits: its CSV files are rewritten once
    a second while it runs and miss the last moments."""
    env = {k: v for k, v in os.environ.items() if k != "MOBISERVE_IMAGES"}
    if images is not None:
        env["MOBISERVE_IMAGES"] = str(require(images))
    prefix = tmp / f"run-{len(list(tmp.glob('run-*')))}"
    launched = time.time()
    proc = await asyncio.create_subprocess_exec(
        LOCUST, "-f", str(locustfile), "--host", target, "--headless", "--only-summary",
        "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--csv", str(prefix), "--json-file", str(prefix),
        *args, env=env, cwd=tmp, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds + 60)
    except TimeoutError:
        proc.kill()
        raise
    stats, failures = {}, []
    if Path(f"{prefix}.json").exists():
        stats = {entry["name"]: entry for entry in json.loads(Path(f"{prefix}.json").read_text())}
        with open(f"{prefix}_failures.csv") as f:
            failures = list(csv.DictReader(f))
    return Run(proc.returncode or 0, out.decode(errors="replace"), launched, stats, failures)


@asynccontextmanager
async def delayed_link(port: int, delay: float) -> AsyncIterator[int]:
    """A TCP relay on 127.0.0.1 to `port` that delivers every chunk `delay` seconds after it
    arrived, in order: the round trip of a distant server, with no limit on calls in flight."""

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        due: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                at, data = await due.get()
                await asyncio.sleep(at - loop.time())  # the link's latency itself, not a wait for an event
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            writer.close()

        delivering = asyncio.create_task(deliver())
        try:
            while data := await reader.read(1 << 16):
                due.put_nowait((loop.time() + delay, data))
        finally:
            due.put_nowait((loop.time() + delay, b""))
            await delivering

    async def connect(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(
            relay(client_reader, server_writer), relay(server_reader, client_writer), return_exceptions=True
        )

    link = await asyncio.start_server(connect, "127.0.0.1", 0)
    try:
        yield link.sockets[0].getsockname()[1]
    finally:
        link.close()


def answered(server: App, method: str) -> int:
    """Calls (stream messages) the server answered OK so far, by its own count."""
    labels = {"model": "int8", "method": method, "code": "OK"}
    return int(server.metrics.registry.get_sample_value("mobiserve_requests_total", labels) or 0)


async def test_users_overlap_through_a_slow_link(server: App, tmp_path: Path) -> None:
    one_at_a_time = 1 / (2 * DELAY)  # the most calls/s of any client making one call at a time
    async with delayed_link(server.port, DELAY) as port:
        one = await locust(EXAMPLE, f"127.0.0.1:{port}", tmp_path, users=1, seconds=4)
        before = answered(server, "Classify")
        many = await locust(EXAMPLE, f"127.0.0.1:{port}", tmp_path, users=16, seconds=4)
        on_the_server = answered(server, "Classify") - before
    for run in (one, many):
        assert run.code == 0 and run.failures == [], run.log[-3000:]
    assert 0 < one.rate("Classify int8") <= one_at_a_time
    assert many.rate("Classify int8") > 2 * one_at_a_time >= 2 * one.rate("Classify int8")
    assert many.requests("ListModels") == 16  # one Client per user, each asking the default model once
    # every answer was reported, but for those in flight when Locust stopped its users (one each)
    assert 0 <= on_the_server - many.requests("Classify int8") <= 16
    assert many.response_bytes("Classify int8") > 0


async def test_a_stream_reports_each_image(server: App, tmp_path: Path) -> None:
    before = answered(server, "ClassifyStream")
    run = await locust(EXAMPLE, f"127.0.0.1:{server.port}", tmp_path, "--stream", "4", users=2)
    on_the_server = answered(server, "ClassifyStream") - before
    assert run.code == 0 and run.failures == [], run.log[-3000:]
    assert 0 <= on_the_server - run.requests("ClassifyStream int8") <= 2 * 4  # the last streams' images in flight
    assert run.requests("ClassifyStream int8") > 0
    assert run.response_bytes("ClassifyStream int8") > 0


def broken_images(tmp_path: Path) -> Path:
    """A folder where one image in two does not decode: the server refuses those, alone."""
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(sorted(require(SAMPLE).glob("*.JPEG"))[0], folder / "good.JPEG")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after all")
    return folder


async def test_a_refused_image_is_a_failure_named_by_its_status(server: App, tmp_path: Path) -> None:
    run = await locust(EXAMPLE, f"127.0.0.1:{server.port}", tmp_path, users=2, images=broken_images(tmp_path))
    assert run.code == 1, run.log[-3000:]  # Locust's exit code when anything failed
    assert 0 < run.failed("Classify int8") < run.requests("Classify int8")  # the good image is answered all along
    assert {(f["Name"], f["Error"]) for f in run.failures} == {("Classify int8", "INVALID_ARGUMENT")}


async def test_a_refused_image_in_a_stream_is_a_failure_named_by_its_status(server: App, tmp_path: Path) -> None:
    """One failure per refused image; the client ends the stream there (what it had in flight
    then is not counted), so which good images were answered first depends on timing."""
    folder = broken_images(tmp_path)
    run = await locust(EXAMPLE, f"127.0.0.1:{server.port}", tmp_path, "--stream", "4", users=2, images=folder)
    assert run.code == 1, run.log[-3000:]
    assert run.failed("ClassifyStream int8") > 0
    assert {(f["Name"], f["Error"]) for f in run.failures} == {("ClassifyStream int8", "INVALID_ARGUMENT")}


async def test_an_unknown_model_fails_every_call_with_not_found_across_processes(server: App, tmp_path: Path) -> None:
    run = await locust(EXAMPLE, f"127.0.0.1:{server.port}", tmp_path, "--model", "nope", "--processes", "2", users=4)
    assert run.code == 1, run.log[-3000:]
    assert run.failed("Classify nope") == run.requests("Classify nope") > 0
    assert [(f["Name"], f["Error"]) for f in run.failures] == [("Classify nope", "NOT_FOUND")]


async def test_without_images_it_stops_naming_the_variable(tmp_path: Path) -> None:
    run = await locust(EXAMPLE, "127.0.0.1:1", tmp_path, images=None)
    assert run.code != 0 and run.stats == {}
    assert "MOBISERVE_IMAGES is not set" in run.log


async def test_a_channel_opened_before_the_import_is_refused(tmp_path: Path) -> None:
    """Said at once, rather than letting the users run one call at a time."""
    late = tmp_path / "late.py"
    late.write_text(
        "from mobiserve.client import Client\n"
        "probe = Client('127.0.0.1:1')\n"
        "from mobiserve.client.locust import ClassifierUser\n"
    )
    run = await locust(late, "127.0.0.1:1", tmp_path)
    assert run.code != 0 and run.stats == {}
    assert "GeventTooLate: gRPC channels were created before mobiserve.client.locust was imported" in run.log


def test_only_the_locust_extra_installs_locust() -> None:
    requirements = importlib.metadata.requires("mobiserve") or []
    locust = [r for r in requirements if r.startswith("locust")]
    assert locust and all('extra == "locust"' in r for r in locust), requirements
