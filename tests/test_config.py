"""The configuration as a user meets it: a TOML file validated as a whole before anything
starts, flags checked before any work, and help that shows each default once, from the
dataclasses that set it. In-process: `mobiserve`'s own `main`, exit codes and stderr."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from mobiserve.server.config import ConfigError, ModelConfig, ServerConfig, load_toml

from helpers import cli

ROOT = Path(__file__).resolve().parents[1]


MODEL = '[[models]]\nname = "m"\npath = "model.onnx"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            MODEL + 'max_batch_size = "big"\n',
            "[[models]] #1 (name 'm'): max_batch_size: expected `int`, got `str` ('big')",
        ),
        ('[[models]]\npath = "model.onnx"\n', "[[models]] #1: missing required key `name`"),
        (MODEL + "instances = 1.5\n", "[[models]] #1 (name 'm'): instances: expected `int`, got `float` (1.5)"),
        (MODEL + "max_batch_size = 0\n", "[[models]] #1 (name 'm'): max_batch_size must be at least 1, got 0"),
        (MODEL + "allow_spinning = 1\n", "[[models]] #1 (name 'm'): allow_spinning: expected `bool`, got `int` (1)"),
        (MODEL + "batch = 4\n", "[[models]] #1 (name 'm'): unknown keys ['batch']"),
        ('[server]\nport = "fifty"\n' + MODEL, "[server]: port: expected `int`, got `str` ('fifty')"),
        ("[server]\nport = 99999\n" + MODEL, "[server]: port must be at most 65535, got 99999"),
        ("[server]\nmetrics_port = 70000\n" + MODEL, "[server]: metrics_port must be at most 65535, got 70000"),
        ("[server]\nkeepalive_time_s = 0\n" + MODEL, "[server]: keepalive_time_s must be positive, got 0"),
        ("[server]\nport = 1\n", "no [[models]] table"),
        ("[server\nport = 1\n", "not valid TOML: Expected ']'"),
        ("[model]\n", "unknown table or key ['model']"),
        (MODEL + MODEL, "model names must be unique"),
        (MODEL + "bulk_min_share = 1.5\n", "[[models]] #1 (name 'm'): bulk_min_share must be at most 1, got 1.5"),
        (
            MODEL + "interactive_levels = 3\n",
            "[[models]] #1 (name 'm'): interactive_levels (3) must be at most priority_levels (2)",
        ),
        (
            MODEL + "priority_levels = 3\ndefault_priority_level = 4\n",
            "[[models]] #1 (name 'm'): default_priority_level must be 0 (by RPC) or a level from 1 to priority_levels",
        ),
        ("[server]\nbulk_nice = 20\n" + MODEL, "[server]: bulk_nice must be at most 19, got 20"),
    ],
    ids=lambda v: v[:40] if isinstance(v, str) else v,
)
def test_each_toml_mistake_is_one_line_naming_the_file_table_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = tmp_path / "mobiserve.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_toml(path)
    assert str(e.value).startswith(f"{path}: {message}"), e.value
    # the same through the command, before anything is loaded or bound: one line, exit 1
    code, out, err = cli(capsys, "serve", "--config", str(path), "--port", "0")
    assert (code, out) == (1, "")
    assert err.splitlines() == [f"mobiserve: error: {e.value}"]


def test_a_valid_file_and_flags_that_override_it(tmp_path: Path) -> None:
    path = tmp_path / "mobiserve.toml"
    path.write_text('[server]\nport = "fifty"\n' + MODEL)
    with pytest.raises(ConfigError, match="port: expected `int`"):  # the whole file, whatever the flags say
        load_toml(path, port=8000)
    path.write_text("[server]\nport = 8000\ngrace_s = 2\n" + MODEL + "max_queue_delay_ms = 2\n")
    config = load_toml(path, port=9000, grace_s=None)
    assert (config.port, config.grace_s, config.models[0].max_queue_delay_ms) == (9000, 2.0, 2.0)
    assert config.models[0].path == str(tmp_path / "model.onnx")  # relative to the file


def test_the_documented_sample_config_is_every_default(tmp_path: Path) -> None:
    """docs/operations.md's complete file loads, and says what the dataclasses say."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", doc, re.DOTALL)
    path = tmp_path / "mobiserve.toml"
    path.write_text(block)
    config = load_toml(path)
    assert [(m.name, Path(m.path).name) for m in config.models] == [
        ("int8", "mobilenetv2-12-int8.onnx"),
        ("fp32", "mobilenetv2-12.onnx"),
    ]
    for field in dataclasses.fields(ServerConfig):
        if field.name not in ("models", "default_model"):
            assert getattr(config, field.name) == field.default, field.name
    server, model = block.split("\n[[models]]\n")[:2]

    def keys(table: str) -> set[str]:
        return set(re.findall(r"^#? ?(\w+) = ", table, re.MULTILINE))

    assert keys(server) == {f.name for f in dataclasses.fields(ServerConfig)} - {"models"}, "every key is shown"
    assert keys(model) == {f.name for f in dataclasses.fields(ModelConfig)}, "every [[models]] key is shown"
    for field in dataclasses.fields(ModelConfig):
        if field.name not in ("name", "path", "synsets"):
            assert getattr(config.models[0], field.name) == field.default, field.name


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--port", "99999"],
        ["serve", "--port", "65536"],
        ["serve", "--port", "-1"],
        ["serve", "--metrics-port", "99999"],
        ["serve", "--port", "fifty"],
    ],
    ids=" ".join,
)
def test_ports_outside_0_to_65535_are_usage_errors(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, out, err = cli(capsys, *args)
    assert (code, out) == (2, "")
    assert err.splitlines()[-1].startswith(f"mobiserve serve: error: argument {args[1]}: ")
    assert "Traceback" not in err


def test_per_model_flags_with_a_config_file_are_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mobiserve.toml"
    path.write_text(MODEL)
    code, out, err = cli(capsys, "serve", "--config", str(path), "--max-batch-size", "4", "--allow-spinning")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "mobiserve: error: --max-batch-size, --allow-spinning set a --model's knobs; "
        "with --config, set them in each [[models]] table"
    ]


def help_blocks(text: str) -> dict[str, str]:
    """`--help` output as {option: its help text, on one line}."""
    blocks: dict[str, str] = {}
    option = ""
    for line in text.splitlines():
        found = re.match(r"^  (-\w, )?(--[\w-]+)", line)
        if found:
            option = found[2]
            blocks[option] = line
        elif option and line.startswith("     "):
            blocks[option] += " " + line.strip()
        else:
            option = ""
    return blocks


def test_help_shows_each_default_once_from_where_it_is_set(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "serve", "--help")
    assert code == 0
    serve = help_blocks(out)
    for text in serve.values():
        assert "None" not in text and len(re.findall(r"[(;] ?default", text)) <= 1, text
    fields = {"--port": "port", "--grace-period": "grace_s", "--keepalive-time": "keepalive_time_s"}
    fields |= {"--max-connection-idle": "max_connection_idle_s", "--max-images-per-request": "max_images_per_request"}
    for option, name in fields.items():
        assert f"default {ServerConfig.__dataclass_fields__[name].default:g}" in serve[option], serve[option]
    for option, name in {"--max-batch-size": "max_batch_size", "--max-queue-size": "max_queue_size"}.items():
        assert f"default {ModelConfig.__dataclass_fields__[name].default}" in serve[option], serve[option]
    assert "(default: INFO)" in serve["--log-level"]
    for command, options in {
        "evaluate": ["--rounds", "--batch-size", "--threads"],
        "quantize": ["--rounds", "--batch-size", "--method", "--calibration-count", "--per-channel"],
    }.items():
        code, out, _ = cli(capsys, command, "--help")
        blocks = help_blocks(out)
        for option in options:
            assert "default" in blocks[option] and "None" not in blocks[option], (command, blocks[option])
