"""Server and model configuration: dataclasses, built from CLI flags or a TOML file.

TOML (paths relative to the file):

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
    intra_op_threads = 2
    decode = "exact"                # "fast": large JPEGs decoded scaled down (docs/performance.md)
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mobiserve.common.labels import IMAGENET_SYNSETS
from mobiserve.server.runtime.session import default_instances, default_intra_op_threads

Decode = Literal["exact", "fast"]  # JPEG decoding: the card's, or scaled for large photos (processing/preprocess.py)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: str
    synsets: str = str(IMAGENET_SYNSETS)
    version: str = "1"
    max_batch_size: int = 32
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 1024  # images waiting for a batch; 0 = unbounded
    instances: int = 0  # 0: one per 4 cores
    intra_op_threads: int = 0  # 0: the cores divided among instances
    allow_spinning: bool = False
    decode: Decode = "exact"  # "fast": large JPEGs decoded at 1/2..1/8 scale (docs/performance.md#large-photos)

    def __post_init__(self) -> None:
        if self.decode not in typing.get_args(Decode):
            raise ValueError(f"decode must be one of {', '.join(typing.get_args(Decode))}, got {self.decode!r}")
        _at_least(self, 1, "max_batch_size")
        _at_least(self, 0, "max_queue_delay_ms", "max_queue_size", "instances", "intra_op_threads")

    def resolved(self) -> ModelConfig:
        """Fill the CPU-derived defaults for this machine."""
        instances = self.instances or default_instances()
        threads = self.intra_op_threads or default_intra_op_threads(instances)
        return dataclasses.replace(self, instances=instances, intra_op_threads=threads)


@dataclass(frozen=True)
class ServerConfig:
    models: tuple[ModelConfig, ...]
    default_model: str = ""
    host: str = "127.0.0.1"
    port: int = 50051
    max_message_bytes: int = 64 << 20
    max_images_per_request: int = 256
    max_pixels: int = 50_000_000
    preprocess_threads: int = 0  # 0: one per core this process may use
    workers: int = 1  # server processes on the port (server/workers.py); 0: one per 4 cores
    pin_cpus: bool = False  # pin each worker to its share of the cores
    default_timeout_s: float = 30.0  # when the client sets no deadline
    grace_s: float = 30.0  # SIGTERM: time to answer what is queued and in flight
    metrics_port: int = 0  # 0: no metrics endpoint
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    expose_model_paths: bool = False  # ListModels gives each model's full path, not only its file name
    # connections (transport/connections.py; docs/operations.md says why these defaults)
    max_connection_idle_s: float = 300.0  # close a connection without calls after this long (0: never)
    max_connection_age_s: float = 0.0  # close any connection this old, gracefully (0: never)
    max_connection_age_grace_s: float = 30.0  # then cut what still runs on it (0: wait for it)
    keepalive_time_s: float = 60.0  # ping a connection that was silent this long
    keepalive_timeout_s: float = 20.0  # and close it if the ping is not answered in this time
    min_ping_interval_s: float = 10.0  # clients may ping this often; more often and they are cut off

    def __post_init__(self) -> None:
        _at_least(self, 0, "port", "metrics_port", "grace_s")
        _at_least(self, 0, "max_connection_idle_s", "max_connection_age_s", "max_connection_age_grace_s")
        _at_least(self, 0, "min_ping_interval_s")
        for name in ("keepalive_time_s", "keepalive_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        _at_least(self, 1, "max_message_bytes", "max_images_per_request", "max_pixels")
        _at_least(self, 0, "preprocess_threads", "workers")
        if self.default_timeout_s <= 0:
            raise ValueError(f"default_timeout_s must be positive, got {self.default_timeout_s}")
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


def _at_least(config: object, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {value}")


_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}
_SERVER_KEYS = {f.name for f in dataclasses.fields(ServerConfig)} - {"models"}


def load_toml(path: str | Path, **overrides: Any) -> ServerConfig:
    """Read a TOML config; `overrides` (from CLI flags) win over the [server] table."""
    path = Path(path)
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    server = dict(data.get("server", {}))
    unknown = set(server) - _SERVER_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown [server] keys {sorted(unknown)}; known: {sorted(_SERVER_KEYS)}")
    models = []
    for i, entry in enumerate(data.get("models", [])):
        unknown = set(entry) - _MODEL_KEYS
        if unknown:
            raise ValueError(
                f"{path}: [[models]] #{i + 1}: unknown keys {sorted(unknown)}; known: {sorted(_MODEL_KEYS)}"
            )
        entry = dict(entry)
        for key in ("path", "synsets"):
            if key in entry:
                entry[key] = str((path.parent / entry[key]).resolve())
        models.append(ModelConfig(**entry))
    for key in ("tls_cert", "tls_key", "tls_client_ca"):
        if server.get(key):
            server[key] = str((path.parent / server[key]).resolve())
    server.update({k: v for k, v in overrides.items() if v is not None})
    return ServerConfig(models=tuple(models), **server)
