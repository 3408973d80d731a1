"""`mobiserve classify`, `validate` and `models` as a user runs them, against the shared server.

The commands run as subprocesses awaited on the event loop, so the in-process server serves them.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import pytest

from mobiserve.client import AsyncClient, RetryPolicy
from mobiserve.server.app import App

from helpers import MOBISERVE, SYNSETS, cli, free_port


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        MOBISERVE,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def target_of(server: App) -> str:
    return f"127.0.0.1:{server.port}"


async def test_classify_prints_a_table_per_image(server: App, sample_images: list[Path]) -> None:
    images = sample_images[10:12]
    async with AsyncClient(target_of(server)) as client:
        expected = [await client.classify(p) for p in images]
    code, out, err = await run("classify", *map(str, images), "--target", target_of(server))
    assert code == 0 and err == ""
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 2
    for block, path, result in zip(blocks, images, expected):
        title, header, *rows = block.splitlines()
        assert title.startswith(str(path))
        assert header.split() == ["rank", "class", "wnid", "probability"]
        assert len(rows) == 5
        first = rows[0].split()
        assert first[0] == "1" and result.top.wnid in first and first[-1] == f"{result.top.score:.4f}"
        assert result.top.name in rows[0]


async def test_classify_json(server: App, sample_images: list[Path]) -> None:
    images = sample_images[20:23]
    async with AsyncClient(target_of(server)) as client:
        expected = [await client.classify(p, top_k=3) for p in images]
    code, out, err = await run("classify", *map(str, images), "--top-k", "3", "--json", "--target", target_of(server))
    assert code == 0, err
    answers = json.loads(out)
    assert [a["image"] for a in answers] == list(map(str, images))
    assert [[c["wnid"] for c in a["classes"]] for a in answers] == [[c.wnid for c in r.classes] for r in expected]
    assert all(a["model"] == "int8" and a["timing"]["batch_size"] >= 1 for a in answers)


# name: (arguments, words in the one-line error); {tmp} holds notes.jpg (text) and empty/
FAILURES: dict[str, tuple[list[str], str]] = {
    "missing image": (["classify", "{tmp}/missing.jpg", "--target", "{target}"], "no such file"),
    "not an image": (
        ["classify", "{tmp}/notes.jpg", "--target", "{target}"],
        "{tmp}/notes.jpg: image 0: not a decodable image",
    ),
    "unknown model": (["classify", "{tmp}/notes.jpg", "--target", "{target}", "--model", "nope"], "NOT_FOUND"),
    "unreachable server": (["classify", "{tmp}/notes.jpg", "--target", "{nobody}"], "server {nobody} is unavailable"),
    "validate a missing folder": (["validate", "{tmp}/nowhere", "--target", "{target}"], "not a folder"),
    "validate an empty folder": (["validate", "{tmp}/empty", "--target", "{target}"], "no labelled images"),
    "validate, missing synsets": (
        ["validate", "{tmp}", "--synsets", "{tmp}/none.txt", "--target", "{target}"],
        "none.txt",
    ),
    "models, unreachable server": (["models", "--target", "{nobody}"], "server {nobody} is unavailable"),
}


@pytest.mark.parametrize("name", FAILURES)
async def test_errors_exit_1_with_one_line(server: App, tmp_path: Path, name: str) -> None:
    (tmp_path / "notes.jpg").write_text("this is not an image")
    (tmp_path / "empty").mkdir()
    fill = {"tmp": tmp_path, "target": target_of(server), "nobody": f"127.0.0.1:{free_port()}"}
    template, words = FAILURES[name]
    code, out, err = await run(*(arg.format(**fill) for arg in template))
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("mobiserve: error: ") and words.format(**fill) in err, err


@pytest.mark.slow
async def test_validate_the_sample_reaches_the_cards_accuracy(server: App, sample_images: list[Path]) -> None:
    folder = sample_images[0].parent
    code, out, err = await run("validate", str(folder), "--target", target_of(server), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["count"] == len(sample_images) and report["skipped"] == 0
    assert report["top1"] >= 0.83 and report["top5"] >= report["top1"]
    assert report["model"] == "int8" and report["images_per_second"] > 0
    worst = report["worst_classes"]
    assert 0 < len(worst) <= 10 and all(w["top1"] < 1 for w in worst)
    assert [w["top1"] for w in worst] == sorted(w["top1"] for w in worst)


async def test_validate_an_imagenet_style_folder(server: App, sample_images: list[Path], tmp_path: Path) -> None:
    """`<wnid>/` folders (symlinks to the sample); files with no known label are skipped and said so."""
    subset = sample_images[::13]
    for path in subset:
        wnid = path.name.split("_")[0]
        (tmp_path / wnid).mkdir(exist_ok=True)
        (tmp_path / wnid / path.name.partition("_")[2]).symlink_to(path)
    (tmp_path / "n99999999").mkdir()
    (tmp_path / "n99999999" / "stray.JPEG").symlink_to(subset[0])
    (tmp_path / "README.txt").write_text("not an image: ignored")
    async with AsyncClient(target_of(server)) as client:
        hits = [(await client.classify(p)).top.wnid == p.name.split("_")[0] for p in subset]
    code, out, err = await run("validate", str(tmp_path), "--synsets", str(SYNSETS), "--target", target_of(server))
    assert code == 0, err
    assert "skipped 1 image file(s)" in err and "n99999999" in err
    lines = out.splitlines()
    assert lines[0].startswith(f"{len(subset)} images from int8 at {target_of(server)}")
    assert lines[1].split() == ["top-1", "accuracy", f"{sum(hits) / len(hits):.4f}"]
    assert lines[2].split()[:2] == ["top-5", "accuracy"]


async def test_models_lists_the_server_and_honours_mobiserve_target(server: App) -> None:
    code, out, err = await run("models", env={"MOBISERVE_TARGET": target_of(server)})
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split()[:3] == ["model", "version", "classes"]
    assert row.split()[:4] == ["int8", "(default)", "1", "1000"]
    code, out, err = await run("models", "--target", target_of(server), "--json")
    assert code == 0, err
    assert [(m["name"], m["is_default"], m["num_classes"]) for m in json.loads(out)] == [("int8", True, 1000)]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["classify", "{image}", "--top-k", "0"], "argument --top-k: must be at least 1, got 0"),
        (["classify", "{image}", "--target", "127.0.0.1:99999"], "port 99999 is not 1 to 65535"),
        (["health", "--target", "localhost:65536"], "port 65536 is not 1 to 65535"),
        (["validate", "{folder}", "--max-in-flight", "0"], "argument --max-in-flight: must be at least 1"),
        (["health", "--timeout", "0"], "argument --timeout: must be positive"),
        (["models", "--tls-cert", "{image}"], "--tls-cert and --tls-key go together"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_usage_errors_exit_2_before_any_network(
    capsys: pytest.CaptureFixture[str], sample_images: list[Path], args: list[str], words: str
) -> None:
    with socket.socket() as listener:  # the target: a port that counts connection attempts
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        target = f"127.0.0.1:{listener.getsockname()[1]}"
        fill = {"image": str(sample_images[0]), "folder": str(sample_images[0].parent)}
        line = [a.format(**fill) for a in args]
        code, out, err = cli(capsys, *line, *(["--target", target] if "--target" not in line else []))
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    assert (code, out) == (2, ""), err
    assert words in err.splitlines()[-1] and "Traceback" not in err, err


def test_a_retry_policy_gRPC_would_clamp_is_refused_in_words() -> None:
    for attempts in (1, 6, 9):
        with pytest.raises(ValueError, match=f"max_attempts={attempts}\\): gRPC makes 2 to 5 attempts"):
            RetryPolicy(max_attempts=attempts)
    with pytest.raises(ValueError, match="initial_backoff_s=0"):
        RetryPolicy(initial_backoff_s=0)
    assert RetryPolicy(max_attempts=2).max_attempts == 2


async def test_validate_skips_and_counts_files_without_a_wnid_label(
    server: App, sample_images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Folders and files named otherwise are not scored as wrong answers: they are skipped and said so."""
    for path in sample_images[:2]:
        (tmp_path / path.name).symlink_to(path)
    for folder in ("bench1", "bench2"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.jpg").symlink_to(sample_images[3])
    (tmp_path / "ok_big.png").symlink_to(sample_images[4])
    code, out, err = await asyncio.to_thread(
        cli, capsys, "validate", str(tmp_path), "--target", target_of(server), "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    assert (report["count"], report["skipped"]) == (2, 3)
    assert "skipped 3 image file(s) without a <wnid>_ prefix or <wnid>/ folder" in err
