"""docs/client.md's web backend, run as written: FastAPI under uvicorn, a real process on
127.0.0.1, in front of the shared server; and the same app with its AsyncClient made at import
time, as backends make their HTTP clients."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mobiserve.client import AsyncClient
from mobiserve.server.app import App

from helpers import free_port, poll_until

pytestmark = pytest.mark.slow  # uvicorn processes
ROOT = Path(__file__).resolve().parents[1]
CALLERS, CALLS_EACH = 8, 5


def documented_backend() -> str:
    doc = (ROOT / "docs" / "client.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", doc, re.DOTALL) if "backend.py" in block]
    return str(code)


def made_at_import_time(code: str) -> str:
    """The same app, but its client made when the module is imported (no event loop running yet)."""
    lifespan = "app = FastAPI(lifespan=lifespan)\n"
    assert lifespan in code
    return code.replace(lifespan, "app = FastAPI()\napp.state.classifier = AsyncClient(TARGET)\n")


def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/octet-stream"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(params=["lifespan", "import-time"])
def backend(request: pytest.FixtureRequest, server: App, tmp_path: Path) -> Iterator[str]:
    """uvicorn serving the backend on 127.0.0.1; yields its base URL."""
    code = documented_backend()
    (tmp_path / "backend.py").write_text(code if request.param == "lifespan" else made_at_import_time(code))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "backend:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env={**os.environ, "MOBISERVE_TARGET": f"127.0.0.1:{server.port}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=60)[0]
    # uvicorn shuts the app down (the lifespan closes the client), then ends by the signal it got
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in log, log
    assert "Traceback" not in log and "ERROR" not in log, log


def listening(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as probe:
        return probe.connect_ex((host, int(port))) == 0


async def test_the_documented_backend_answers_concurrent_callers(
    backend: str, server: App, sample_images: list[Path]
) -> None:
    await poll_until(lambda: listening(backend), timeout_s=60)
    images = sample_images[: CALLERS * CALLS_EACH]
    async with AsyncClient(f"127.0.0.1:{server.port}") as client:
        expected = [[c.name for c in (await client.classify(p, top_k=3)).classes] for p in images]

    def caller(mine: list[Path]) -> list[tuple[int, dict[str, Any]]]:
        return [post(f"{backend}/classify", path.read_bytes()) for path in mine]

    answers = await asyncio.gather(*(asyncio.to_thread(caller, images[i::CALLERS]) for i in range(CALLERS)))
    got = {str(path): answer for i in range(CALLERS) for path, answer in zip(images[i::CALLERS], answers[i])}
    for path, names in zip(images, expected):
        status, body = got[str(path)]
        assert status == 200, body
        assert body["model"] == "int8" and [c["name"] for c in body["classes"]] == names

    status, body = await asyncio.to_thread(post, f"{backend}/classify", b"not an image")
    assert status == 400 and "image 0" in str(body["detail"]), body
    status, body = await asyncio.to_thread(post, f"{backend}/classify?top_k=0", images[0].read_bytes())
    assert status == 422, body
