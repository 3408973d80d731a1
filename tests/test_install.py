"""The thin client install, as a backend team gets it: the wheel without extras, in a fresh venv.

It must hold none of the server's packages and still classify against a running server, with
the library and with `mobiserve classify`; the server's commands there say what to install.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mobiserve.client import Client
from mobiserve.common.datasets import image_files

from helpers import INT8, SHARED, SYNSETS, ServerProcess, serve

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = (
    "onnxruntime",
    "onnx",
    "simplejpeg",
    "prometheus_client",
    "grpc_health",
    "grpc_reflection",
    "PIL",
    "tqdm",
)


def sh(*cmd: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}: {done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def thin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the project's wheel (`make dist`, as README says) installed without
    extras; returns its bin/."""
    tmp = tmp_path_factory.mktemp("thin")
    built = sh(
        "make",
        "--no-print-directory",
        "-C",
        ROOT,
        "dist",
        f"DIST={tmp / 'dist'}",
        f"VENV={Path(sys.executable).parents[1]}",
    )
    (wheel,) = (tmp / "dist").glob("mobiserve-*.whl")
    assert built.stdout.strip().endswith(str(wheel)), built.stdout
    sh(sys.executable, "-m", "venv", tmp / "venv")
    bin_ = tmp / "venv" / "bin"
    sh(bin_ / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel)
    return bin_


@pytest.fixture(scope="module")
def running() -> Iterator[ServerProcess]:
    server = serve("--model", f"int8={INT8}", "--synsets", str(SYNSETS))
    yield server
    server.stop()


def test_the_thin_install_holds_none_of_the_server_stack(thin: Path) -> None:
    probe = (
        "import importlib.util, json, sys; print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m)]))"
    )
    present = json.loads(sh(thin / "python", "-c", probe, *SERVER_ONLY, "tqdm").stdout)
    assert present == []
    imported = subprocess.run([thin / "python", "-c", "import onnxruntime"], capture_output=True, text=True)
    assert imported.returncode != 0 and "No module named 'onnxruntime'" in imported.stderr


def test_the_thin_install_classifies_with_the_library_and_the_command(thin: Path, running: ServerProcess) -> None:
    image = image_files(SHARED / "data" / "imagenet-sample")[3]
    with Client(running.target) as client:  # the full install's answer, to compare with
        wnid = client.classify(image).top.wnid
    library = (
        "import sys\nfrom mobiserve.client import Client\n"
        "with Client(sys.argv[1]) as c:\n    print(c.classify(sys.argv[2]).top.wnid, c.health())\n"
    )
    assert sh(thin / "python", "-c", library, running.target, image).stdout.split() == [wnid, "SERVING"]
    answers = json.loads(sh(thin / "mobiserve", "classify", image, "--target", running.target, "--json").stdout)
    assert answers[0]["classes"][0]["wnid"] == wnid
    assert sh(thin / "mobiserve", "health", "--target", running.target).stdout.strip() == "SERVING"


def test_server_commands_in_the_thin_install_say_what_to_install(thin: Path, tmp_path: Path) -> None:
    for command in (["serve"], ["evaluate", str(INT8), "--images", str(tmp_path)], ["bench", "--images", "x"]):
        done = subprocess.run([thin / "mobiserve", *command], capture_output=True, text=True, timeout=60)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert "pip install 'mobiserve[" in lines[0] and "onnxruntime" in lines[0]


def test_the_thin_install_pulls_models(thin: Path, tmp_path: Path) -> None:
    pulled = sh(thin / "mobiserve", "models", "pull", "int8", "--from", INT8.parent, "--dir", tmp_path)
    assert "sha256 verified" in pulled.stdout and (tmp_path / INT8.name).stat().st_size == INT8.stat().st_size
