"""Server and model configuration: dataclasses, built from CLI flags or a TOML file.

The dataclasses are the one schema: a field's type, its default, and its range (the `Range` in
its annotation) are what the flags' help shows, what `__post_init__` checks, and what a TOML
file is validated against before anything starts (msgspec converts the file's tables into these
dataclasses: strict types, required keys, ranges). A new field needs nothing else.

TOML (paths relative to the file; docs/operations.md has a complete example):

    [server]
    host = "127.0.0.1"
    port = 50051
    default_model = "int8"          # else the first model

    [[models]]
    name = "int8"
    path = "models/mobilenetv2-12-int8.onnx"
    max_batch_size = 32             # every [[models]] key below is optional
    max_queue_delay_ms = 0.0
    instances = 1
    intra_op_threads = 1
    lone_threads = 2                # the all-core path for interactive work (runtime/model.py)
    bulk_max_batch_size = 8         # the lanes: docs/serving.md#priorities
    decode = "exact"                # "fast": large JPEGs decoded scaled down (docs/performance.md)
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from mobiserve.common.labels import IMAGENET_SYNSETS


@dataclass(frozen=True)
class Range:
    """A field's allowed values, in its annotation: `Annotated[int, Range(ge=1)]`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    nonempty: bool = False


# The ranges, named once. A field annotated with one is checked wherever a config is made.
Name = Annotated[str, Range(nonempty=True)]
Port = Annotated[int, Range(ge=0, le=65535)]  # 0: pick a free one (or, for metrics, none)
Count = Annotated[int, Range(ge=0)]
AtLeastOne = Annotated[int, Range(ge=1)]
NonNegative = Annotated[float, Range(ge=0)]
Positive = Annotated[float, Range(gt=0)]
MessageBytes = Annotated[int, Range(ge=1, le=2**31 - 1)]  # gRPC keeps the limit in an int32
Share = Annotated[float, Range(ge=0, le=1)]
Nice = Annotated[int, Range(ge=0, le=19)]  # added to a thread's nice value: Linux's range

Decode = Literal["exact", "fast"]  # JPEG decoding: the card's, or scaled for large photos (processing/preprocess.py)


@dataclass(frozen=True)
class ModelConfig:
    name: Name
    path: Name
    synsets: str = str(IMAGENET_SYNSETS)
    version: str = "1"
    max_batch_size: AtLeastOne = 32
    max_queue_delay_ms: NonNegative = 0.0
    max_queue_size: Count = 1024  # interactive lane: images waiting for a batch; 0 = unbounded
    instances: Count = 0  # 0: one per 4 cores
    intra_op_threads: Count = 0  # 0: the cores divided among instances
    lone_threads: Count = 0  # the all-core path's threads (interactive work); 0: the server's cores, at most 4
    allow_spinning: bool = False
    # Priorities and lanes (docs/serving.md#priorities), named after Triton's dynamic_batching
    # settings: requests ask for a level, 1 (most urgent) .. priority_levels; levels up to
    # interactive_levels are served in the interactive lane, the others in the bulk lane.
    priority_levels: AtLeastOne = 2
    interactive_levels: Count = 1
    default_priority_level: Count = 0  # a request that asks for none (0: by RPC, unary 1, streams the last)
    bulk_max_queue_size: Count = 64  # bulk lane: images waiting; a full lane stops reading streams (0 = unbounded)
    bulk_max_batch_size: AtLeastOne = 8  # images per bulk batch: what an interactive image may wait behind
    bulk_min_share: Share = 0.2  # of inference time, guaranteed to bulk work while it has some
    decode: Decode = "exact"  # "fast": large JPEGs decoded at 1/2..1/8 scale (docs/performance.md#large-photos)

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.decode not in typing.get_args(Decode):
            raise ValueError(f"decode must be one of {', '.join(typing.get_args(Decode))}, got {self.decode!r}")
        if self.interactive_levels > self.priority_levels:
            raise ValueError(
                f"interactive_levels ({self.interactive_levels}) must be at most "
                f"priority_levels ({self.priority_levels})"
            )
        if self.default_priority_level > self.priority_levels:
            raise ValueError(
                f"default_priority_level must be 0 (by RPC) or a level from 1 to priority_levels "
                f"({self.priority_levels}), got {self.default_priority_level}"
            )

    def resolved(self) -> ModelConfig:
        """Fill the CPU-derived defaults for this machine."""
        from mobiserve.server.runtime.session import default_instances, default_intra_op_threads, default_lone_threads

        instances = self.instances or default_instances()
        threads = self.intra_op_threads or default_intra_op_threads(instances)
        lone = self.lone_threads or default_lone_threads()
        return dataclasses.replace(self, instances=instances, intra_op_threads=threads, lone_threads=lone)


@dataclass(frozen=True)
class ServerConfig:
    models: tuple[ModelConfig, ...]
    default_model: str = ""
    host: str = "127.0.0.1"
    port: Port = 50051
    max_message_bytes: MessageBytes = 64 << 20
    max_images_per_request: AtLeastOne = 256
    max_pixels: AtLeastOne = 50_000_000
    preprocess_threads: Count = 0  # per lane; 0: twice this process's share of the cores, at most all of them
    bulk_nice: Nice = 3  # bulk work's threads run at an OS priority lowered by this (0: as interactive)
    workers: Count = 0  # server processes on the port (server/workers.py); 0: one per core
    pin_cpus: bool = False  # pin each worker to its share of the cores
    default_timeout_s: Positive = 30.0  # when the client sets no deadline
    grace_s: NonNegative = 30.0  # SIGTERM: time to answer what is queued and in flight
    metrics_port: Port = 0  # 0: no metrics endpoint
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    expose_model_paths: bool = False  # ListModels gives each model's full path, not only its file name
    # connections (transport/connections.py; docs/operations.md says why these defaults)
    max_connection_idle_s: NonNegative = 300.0  # close a connection without calls after this long (0: never)
    max_connection_age_s: NonNegative = 0.0  # close any connection this old, gracefully (0: never)
    max_connection_age_grace_s: NonNegative = 30.0  # then cut what still runs on it (0: wait for it)
    keepalive_time_s: Positive = 60.0  # ping a connection that was silent this long
    keepalive_timeout_s: Positive = 20.0  # and close it if the ping is not answered in this time
    min_ping_interval_s: NonNegative = 10.0  # clients may ping this often; more often and they are cut off

    def __post_init__(self) -> None:
        check_ranges(self)
        if not self.models:
            raise ValueError("no models configured")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        if self.default_model and self.default_model not in names:
            raise ValueError(f"default model {self.default_model!r} is not among {names}")

    @property
    def default(self) -> str:
        return self.default_model or self.models[0].name


def default_of(cls: type[Any], name: str) -> Any:
    """A field's default, for what help texts show: the dataclass is the one place that sets it."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is dataclasses.MISSING:
        raise KeyError(f"{cls.__name__}.{name} has no default")
    return field.default


_RANGES: dict[type, dict[str, Range]] = {}


def _ranges(cls: type) -> dict[str, Range]:
    """Each field's range, read from its annotation (once per class)."""
    if cls not in _RANGES:
        hints = typing.get_type_hints(cls, include_extras=True)
        _RANGES[cls] = {
            name: meta
            for name, hint in hints.items()
            for meta in getattr(hint, "__metadata__", ())
            if isinstance(meta, Range)
        }
    return _RANGES[cls]


def check_ranges(config: ModelConfig | ServerConfig) -> None:
    """Refuse a value outside its field's range, in words (msgspec calls `__post_init__` too, so a
    file is checked against the same annotations)."""
    for name, meta in _ranges(type(config)).items():
        value = getattr(config, name)
        if meta.nonempty and not value:
            raise ValueError(f"{name} must not be empty")
        if meta.ge is not None and value < meta.ge:
            raise ValueError(f"{name} must be at least {meta.ge}, got {value}")
        if meta.gt is not None and value <= meta.gt:
            more = "positive" if meta.gt == 0 else f"more than {meta.gt}"
            raise ValueError(f"{name} must be {more}, got {value}")
        if meta.le is not None and value > meta.le:
            raise ValueError(f"{name} must be at most {meta.le}, got {value}")


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file, the table and the key."""


_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}
_SERVER_KEYS = {f.name for f in dataclasses.fields(ServerConfig)} - {"models"}
_PATH_KEYS = {"models": ("path", "synsets"), "server": ("tls_cert", "tls_key", "tls_client_ca")}


def load_toml(path: str | Path, **overrides: Any) -> ServerConfig:
    """Read and validate a TOML config as a whole, then apply `overrides` (from CLI flags, None:
    not given), which win over the [server] table. Raises ConfigError."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a TOML file (not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    server, models = _tables(path, data)
    for entry in models:
        _resolve_paths(path, entry, _PATH_KEYS["models"])
    _resolve_paths(path, server, _PATH_KEYS["server"])
    if not models:
        raise ConfigError(f"{path}: no [[models]] table; each model needs one, with at least name and path")
    import msgspec  # the server extra's; this module is also imported for help texts in the thin install

    try:
        config = msgspec.convert({**server, "models": models}, ServerConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(_located(path, str(exc), server, models)) from None
    try:
        return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _tables(path: Path, data: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The [server] table and the [[models]] tables, with no key the dataclasses do not have."""
    unknown = set(data) - {"server", "models"}
    if unknown:
        raise ConfigError(f"{path}: unknown table or key {sorted(unknown)}; a config has [server] and [[models]]")
    server, models = data.get("server", {}), data.get("models", [])
    if not isinstance(server, dict):
        raise ConfigError(f"{path}: `server` must be a table: [server]")
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise ConfigError(f"{path}: `models` must be an array of tables: [[models]], once per model")
    unknown = set(server) - _SERVER_KEYS
    if unknown:
        raise ConfigError(f"{path}: [server]: unknown keys {sorted(unknown)}; known: {sorted(_SERVER_KEYS)}")
    for i, entry in enumerate(models):
        unknown = set(entry) - _MODEL_KEYS
        if unknown:
            raise ConfigError(
                f"{path}: {_model_table(i, models)}: unknown keys {sorted(unknown)}; known: {sorted(_MODEL_KEYS)}"
            )
    return dict(server), [dict(m) for m in models]


def _resolve_paths(path: Path, table: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        if isinstance(table.get(key), str) and table[key]:
            table[key] = str((path.parent / table[key]).resolve())


_AT = re.compile(r"^(?P<message>.*) - at `\$(?P<where>[^`]*)`$", re.DOTALL)
_MODEL_AT = re.compile(r"^\.models\[(?P<index>\d+)\](?:\.(?P<key>\w+))?")


def _located(path: Path, error: str, server: dict[str, Any], models: list[dict[str, Any]]) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.models[0].instances`" as
    "FILE: [[models]] #1 (name 'int8'): instances: expected `int`, got `str` ("1.5")"."""
    match = _AT.match(error)
    message, where = (match["message"], match["where"]) if match else (error, "")
    message = message.replace("Object missing required field", "missing required key")
    message = message[:1].lower() + message[1:]
    if (model := _MODEL_AT.match(where)) is not None:
        index, key = int(model["index"]), model["key"]
        table = _model_table(index, models)
        if not key:
            return f"{path}: {table}: {message}"
        return f"{path}: {table}: {key}: {message}{_given(models[index], key, message)}"
    if where.startswith("."):
        return f"{path}: [server]: {where[1:]}: {message}{_given(server, where[1:], message)}"
    if message.split(" ", 1)[0] in _SERVER_KEYS:  # a range check of ServerConfig.__post_init__
        return f"{path}: [server]: {message}"
    return f"{path}: {message}"


def _given(table: dict[str, Any], key: str, message: str) -> str:
    return f" ({table[key]!r})" if key in table and "got" not in message.split("`")[-1] else ""


def _model_table(index: int, models: list[dict[str, Any]]) -> str:
    name = models[index].get("name")
    return f"[[models]] #{index + 1}" + (f" (name {name!r})" if isinstance(name, str) else "")
