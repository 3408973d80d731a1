"""`mobiserve serve` and `mobiserve models pull` as a user runs them, in real processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from conftest import SYNSETS, request_of
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

MOBISERVE = str(Path(sys.executable).parent / "mobiserve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MOBISERVE, *args], capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]


def wait_serving(target: str, proc: subprocess.Popen[str], limit: float = 60) -> None:
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        end = time.monotonic() + limit
        while time.monotonic() < end and proc.poll() is None:
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service="mobiserve.v1.Classifier"), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"server never became SERVING: {proc.communicate()[1][-2000:]}")


def serve(*args: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    proc = subprocess.Popen([MOBISERVE, "serve", "--port", str(port), *args], stderr=subprocess.PIPE, text=True)
    target = f"127.0.0.1:{port}"
    wait_serving(target, proc)
    return proc, target


def test_serve_two_models_by_name_then_sigterm_exits_0(int8_model: Path, fp32_model: Path, jpeg: bytes) -> None:
    proc, target = serve("--model", f"int8={int8_model}", "--model", f"fp32={fp32_model}", "--synsets", str(SYNSETS))
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            assert stub.Classify(request_of(jpeg), timeout=30).model == "int8"  # the first is the default
            assert stub.Classify(request_of(jpeg, model="fp32"), timeout=30).model == "fp32"
            names = {m.name: m.is_default for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
            assert names == {"int8": True, "fp32": False}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "event=stopped" in err


def test_toml_config(tmp_path: Path, int8_model: Path, jpeg: bytes) -> None:
    config = tmp_path / "mobiserve.toml"
    config.write_text(
        f'[server]\ndefault_model = "small"\n\n[[models]]\nname = "small"\npath = "{int8_model}"\n'
        f'max_batch_size = 4\nversion = "2026.11"\n'
    )
    proc, target = serve("--config", str(config))
    try:
        with grpc.insecure_channel(target) as ch:
            models = pb_grpc.ClassifierStub(ch).ListModels(pb.ListModelsRequest(), timeout=10).models
            assert [(m.name, m.version, m.max_batch_size, m.is_default) for m in models] == [
                ("small", "2026.11", 4, True)
            ]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


@pytest.mark.parametrize("kind", ["missing", "not onnx"])
def test_a_model_that_cannot_load_is_a_clear_startup_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model.onnx"
    if kind == "not onnx":
        path.write_bytes(b"this is not a model")
    r = run("serve", "--model", str(path), "--port", str(free_port()))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mobiserve: error:") and str(path) in last
    # the reason once, and no drain for a server that never served
    lines = r.stderr.strip().splitlines()
    assert [line for line in lines if str(path) in line] == [last], lines
    assert not [line for line in lines if "event=draining" in line or "event=stopped" in line], lines


def test_a_port_in_use_is_one_line_of_ours(int8_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("serve", "--model", str(int8_model), "--port", str(port))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"mobiserve: error: cannot start the server: cannot bind 127.0.0.1:{port}: Address already in use"
    ]


def test_models_pull_verifies_sha256(tmp_path: Path, int8_model: Path) -> None:
    r = run("models", "pull", "int8", "--from", str(int8_model.parent), "--dir", str(tmp_path / "models"))
    assert r.returncode == 0, r.stderr
    assert "sha256 verified" in r.stdout
    pulled = (tmp_path / "models" / int8_model.name).stat()
    assert pulled.st_size == int8_model.stat().st_size
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(pulled.st_mode) == 0o666 & ~umask  # as any file this user writes, not 0600

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(int8_model, mirror / int8_model.name)
    with (mirror / int8_model.name).open("r+b") as f:
        f.seek(1000)
        f.write(b"tampered")
    r = run("models", "pull", "int8", "--from", str(mirror), "--dir", str(tmp_path / "other"))
    assert r.returncode != 0 and "does not match" in r.stderr
    assert not (tmp_path / "other" / int8_model.name).exists()


def test_models_pull_without_network_says_what_to_do(tmp_path: Path) -> None:
    r = run("models", "pull", "int8", "--from", f"http://127.0.0.1:{free_port()}", "--dir", str(tmp_path))
    assert r.returncode != 0
    assert "--model PATH" in r.stderr and "--from" in r.stderr


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-batch-size", "0", "max_batch_size must be at least 1, got 0"),
        ("--max-queue-size", "-1", "max_queue_size must be at least 0, got -1"),
    ],
)
def test_out_of_range_knobs_are_refused_in_one_line(int8_model: Path, flag: str, value: str, message: str) -> None:
    r = run("serve", "--model", str(int8_model), "--port", str(free_port()), flag, value)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"mobiserve: error: {message}"]
