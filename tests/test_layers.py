"""The layer gate works: the contracts are all there, and a forbidden import fails it.

`make lint` (which CI runs) checks the contracts of pyproject.toml with import-linter; this test
makes sure that removing a contract, or adding an import that crosses a layer, cannot pass.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = (
    "the client, the shared vocabulary and the contract stubs never import the server",
    "the server never imports the client or the harness",
    "the thin client and the shared vocabulary need none of the server's packages",
    "the transport knows models by their description, not the runtime or the batcher",
    "server layers: each imports only those below it",
    "the harness uses the server's parts as they are shipped",
)


def check_imports(root: Path) -> subprocess.CompletedProcess[str]:
    env = {"ROOT": str(root), "BIN": str(Path(sys.executable).parent), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [ROOT / "scripts" / "check-package.sh", "imports"], capture_output=True, text=True, env=env, timeout=120
    )


def copy_of_project(tmp_path: Path) -> Path:
    for part in ("protos", "common", "client", "server", "bench"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_every_layer_contract_is_checked_and_kept() -> None:
    done = check_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    kept = " ".join(done.stdout.split())  # contract names wrap across lines
    for name in CONTRACTS:
        assert f"{name}" in kept, f"contract missing from pyproject.toml: {name}"
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("client/_results.py", "import mobiserve.server.serving", "never import the server"),
        ("server/errors.py", "import mobiserve.client", "the server never imports the client"),
        ("client/_base.py", "import onnxruntime", "need none of the server's packages"),
        ("server/transport/convert.py", "import mobiserve.server.runtime.model", "the transport knows models"),
        ("server/processing/normalize.py", "import mobiserve.server.serving", "server layers"),
        ("server/config.py", "import mobiserve.server.serving", "server layers"),
        ("server/errors.py", "import mobiserve.server.metrics", "server layers"),
        ("bench/unbatched.py", "import mobiserve.server.batching", "the harness uses the server's parts"),
        ("bench/cpu.py", "import mobiserve.server.transport.drain", "the harness uses the server's parts"),
    ],
)
def test_an_import_across_a_layer_fails_the_gate(tmp_path: Path, module: str, line: str, broken: str) -> None:
    project = copy_of_project(tmp_path)
    path = project / module
    path.write_text(path.read_text() + f"\n{line}  # crosses a layer\n")
    done = check_imports(project)
    assert done.returncode != 0
    assert broken in " ".join(done.stdout.split()).split("Broken contracts")[-1]


def test_every_server_module_has_a_layer() -> None:
    """A new module or package of the server is placed in the layers, or nothing checks its imports."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in contracts if c["type"] == "layers" and c["name"].startswith("server layers")]
    placed = {name.strip() for layer in layers for name in layer.split("|")}
    server = ROOT / "server"
    parts = {p.stem for p in server.glob("*.py") if p.stem != "__init__"}
    parts |= {p.name for p in server.iterdir() if (p / "__init__.py").exists()}
    assert {f"mobiserve.server.{part}" for part in parts} == placed
