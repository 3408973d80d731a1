"""`mobiserve serve` and `mobiserve models pull` as a user runs them, in real processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
from pathlib import Path

import grpc
import pytest

from mobiserve.v1 import classifier_pb2 as pb
from mobiserve.v1 import classifier_pb2_grpc as pb_grpc

from helpers import SYNSETS, free_port, request_of, run, serve

pytestmark = pytest.mark.slow  # real processes or whole-sample sweeps


def test_serve_two_models_by_name_then_sigterm_exits_0(int8_model: Path, fp32_model: Path, jpeg: bytes) -> None:
    server = serve("--model", f"int8={int8_model}", "--model", f"fp32={fp32_model}", "--synsets", str(SYNSETS))
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            assert stub.Classify(request_of(jpeg), timeout=30).model == "int8"  # the first is the default
            assert stub.Classify(request_of(jpeg, model="fp32"), timeout=30).model == "fp32"
            names = {m.name: m.is_default for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
            assert names == {"int8": True, "fp32": False}
    finally:
        server.signal(signal.SIGTERM)
        code = server.wait(60)
    assert code == 0, server.log[-2000:]
    assert "event=stopped" in server.log


def test_toml_config(tmp_path: Path, int8_model: Path, jpeg: bytes) -> None:
    config = tmp_path / "mobiserve.toml"
    config.write_text(
        f'[server]\ndefault_model = "small"\n\n[[models]]\nname = "small"\npath = "{int8_model}"\n'
        f'max_batch_size = 4\nversion = "2026.11"\n'
    )
    server = serve("--config", str(config))
    try:
        with grpc.insecure_channel(server.target) as ch:
            models = pb_grpc.ClassifierStub(ch).ListModels(pb.ListModelsRequest(), timeout=10).models
            assert [(m.name, m.version, m.max_batch_size, m.is_default) for m in models] == [
                ("small", "2026.11", 4, True)
            ]
    finally:
        server.stop()


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


def test_a_model_folder_serves_the_one_onnx_file_in_it(tmp_path: Path, int8_model: Path, jpeg: bytes) -> None:
    """`--model NAME=DIR`, as KServe mounts a model at /mnt/models: the folder's one *.onnx file,
    whatever it is called, served under NAME; a bare DIR is named after that file."""
    folder = tmp_path / "mnt-models"
    folder.mkdir()
    (folder / "model.onnx").symlink_to(int8_model)
    (folder / "README").write_text("not a model")  # what else a storage bucket may hold
    server = serve("--model", f"mobilenetv2={folder}", "--model", str(folder), "--synsets", str(SYNSETS))
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            assert [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models] == [
                "mobilenetv2",
                "model",
            ]
            answer = stub.Classify(request_of(jpeg), timeout=30)
        assert answer.model == "mobilenetv2" and answer.results[0].classes[0].name == "tench"
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.log[-2000:]


@pytest.mark.parametrize("onnx_files", [[], ["a.onnx", "b.onnx"]], ids=["none", "two"])
def test_a_model_folder_without_exactly_one_onnx_file_is_a_one_line_error(
    tmp_path: Path, int8_model: Path, onnx_files: list[str]
) -> None:
    for name in onnx_files:
        (tmp_path / name).symlink_to(int8_model)
    r = run("serve", "--model", f"m={tmp_path}", "--port", str(free_port()))
    assert r.returncode == 1
    found = f"{len(onnx_files)} .onnx files (a.onnx, b.onnx)" if onnx_files else "no .onnx file"
    assert r.stderr.strip().splitlines() == [
        f"mobiserve: error: model folder {tmp_path} holds {found}: it must hold exactly one, or name the file"
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
    models = tmp_path / "models"
    r = run("models", "pull", "int8", "--from", f"http://127.0.0.1:{free_port()}", "--dir", str(models))
    assert r.returncode != 0
    assert "--model PATH" in r.stderr and "--from" in r.stderr
    assert not models.exists()  # no empty folder left behind


def test_serve_names_the_default_model_after_the_zoo_entry(tmp_path: Path, int8_model: Path) -> None:
    mirror = {"MOBISERVE_MODEL_MIRROR": str(int8_model.parent), "MOBISERVE_MODELS": str(tmp_path / "models")}
    server = serve("--synsets", str(SYNSETS), env=mirror)
    try:
        with grpc.insecure_channel(server.target) as ch:
            models = pb_grpc.ClassifierStub(ch).ListModels(pb.ListModelsRequest(), timeout=10).models
        assert [m.name for m in models] == ["int8"]
        assert (tmp_path / "models" / int8_model.name).is_file()  # pulled there, sha256-checked
    finally:
        server.stop()


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
