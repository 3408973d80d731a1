"""`mobiserve serve`: run the gRPC server (needs the server extra)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobiserve.common import zoo
from mobiserve.common.command import fail, missing

if TYPE_CHECKING:
    from mobiserve.common.command import Subcommands
    from mobiserve.server.config import ServerConfig

log = logging.getLogger("mobiserve.server")
# What `serve` imports beyond the thin client: checked first, so a missing extra is one line.
SERVER_MODULES = ("onnxruntime", "simplejpeg", "PIL", "prometheus_client", "grpc_health", "grpc_reflection")


def register(sub: Subcommands) -> None:
    """Add `serve` to the `mobiserve` parser (an entry point of the `mobiserve.commands` group)."""
    _add_serve(sub)


# ---------------------------------------------------------------------------------------- serve


def _add_serve(sub: Subcommands) -> None:
    p = sub.add_parser("serve", help="run the gRPC server", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="TOML file listing models and server settings (flags override it)")
    p.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]PATH",
        help="ONNX model to serve; repeat for several (the first is the default); "
        "a bare PATH is named after its file; a folder means the one *.onnx file in it. "
        "Default: the zoo's int8 model, pulled if missing",
    )
    p.add_argument("--name", help="name of the model when a single --model is given")
    p.add_argument("--synsets", help="labels file, '<wnid> <name>' per line in output order (default: ImageNet-1k)")
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=None, help="port to bind (default 50051; 0 picks a free one)")
    p.add_argument("--max-batch-size", type=int, default=32, help="images per onnxruntime run at most")
    p.add_argument(
        "--max-queue-delay-ms",
        type=float,
        default=0.0,
        help="let a batch fill for up to this long after its first image (0: never wait)",
    )
    p.add_argument(
        "--max-queue-size",
        type=int,
        default=1024,
        help="images waiting per model before new work is refused with RESOURCE_EXHAUSTED (0: no limit)",
    )
    p.add_argument("--instances", type=int, default=0, help="onnxruntime sessions per model (0: one per 4 cores)")
    p.add_argument("--intra-op-threads", type=int, default=0, help="threads per session (0: cores / instances)")
    p.add_argument("--allow-spinning", action="store_true", help="let onnxruntime threads spin between batches")
    p.add_argument("--preprocess-threads", type=int, default=None, help="decode/resize threads (default: cores)")
    p.add_argument(
        "--decode",
        choices=("exact", "fast"),
        default=None,
        help="fast: decode large JPEGs at 1/2-1/8 scale, several times cheaper and no longer bit-exact "
        "(docs/performance.md); with --config, set decode per model in the file (default: exact)",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        default=None,
        metavar="N|auto",
        help="server processes sharing the port, each with its share of the cores (auto: one per 4 cores; "
        "default 1). Connections, not calls, are spread over them",
    )
    p.add_argument("--pin-cpus", action="store_true", default=None, help="pin each worker to its share of the cores")
    p.add_argument("--max-images-per-request", type=int, default=None, help="default 256")
    p.add_argument("--max-pixels", type=int, default=None, help="largest image accepted, in pixels (default 50 M)")
    p.add_argument("--max-message-mb", type=float, default=None, help="largest gRPC message (default 64 MiB)")
    p.add_argument(
        "--default-timeout", type=float, default=None, help="seconds, for calls without a deadline (default 30)"
    )
    p.add_argument("--grace-period", type=float, default=None, help="seconds to drain on SIGTERM (default 30)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument(
        "--expose-model-paths",
        action="store_true",
        default=None,
        help="ListModels reports each model's full path on this machine (default: its file name only)",
    )
    c = p.add_argument_group("connections", "idle and age limits, keepalive pings (seconds; see docs/operations.md)")
    c.add_argument(
        "--max-connection-idle",
        type=float,
        default=None,
        help="close a connection without calls (default 300; 0: never)",
    )
    c.add_argument(
        "--max-connection-age",
        type=float,
        default=None,
        help="close every connection this old with GOAWAY, so clients reconnect and rebalance (default 0: never)",
    )
    c.add_argument(
        "--max-connection-age-grace",
        type=float,
        default=None,
        help="after that GOAWAY, cut calls still running on it (default 30; 0: wait for them)",
    )
    c.add_argument("--keepalive-time", type=float, default=None, help="ping a connection silent this long (default 60)")
    c.add_argument(
        "--keepalive-timeout",
        type=float,
        default=None,
        help="close it when a ping is unanswered this long (default 20)",
    )
    c.add_argument(
        "--min-ping-interval",
        type=float,
        default=None,
        help="shortest client ping interval allowed, with or without calls (default 10)",
    )
    p.add_argument("--tls-cert", help="server certificate (PEM); enables TLS")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA (PEM) that client certificates must chain to; enables mutual TLS")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    if hint := missing("server", *SERVER_MODULES):
        return fail(hint)
    from mobiserve.server import logs, workers

    logs.configure(args.log_level)
    try:
        config = _server_config(args)
    except (ValueError, OSError) as exc:
        return fail(str(exc))
    count = config.workers or workers.auto_workers()
    if count > 1:  # the supervisor: it imports no server code itself, and prometheus-client only after its setup
        try:
            return asyncio.run(workers.Supervisor(config, count, args.log_level).run())
        except OSError as exc:
            return fail(f"cannot start the server: {exc}")
    from mobiserve.server import app
    from mobiserve.server.errors import ModelLoadError

    try:
        asyncio.run(app.run(config))
    except ModelLoadError as exc:  # one line: the reason (nothing was served, so no drain to report)
        return fail(str(exc))
    except OSError as exc:
        return fail(f"cannot start the server: {exc}")
    return 0


def _server_config(args: argparse.Namespace) -> ServerConfig:
    from mobiserve.server.config import ModelConfig, ServerConfig, load_toml

    overrides = {
        "host": args.host,
        "port": args.port,
        "preprocess_threads": args.preprocess_threads,
        "workers": args.workers,
        "pin_cpus": args.pin_cpus,
        "max_images_per_request": args.max_images_per_request,
        "max_pixels": args.max_pixels,
        "max_message_bytes": None if args.max_message_mb is None else int(args.max_message_mb * (1 << 20)),
        "default_timeout_s": args.default_timeout,
        "grace_s": args.grace_period,
        "metrics_port": args.metrics_port,
        "expose_model_paths": args.expose_model_paths,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "max_connection_idle_s": args.max_connection_idle,
        "max_connection_age_s": args.max_connection_age,
        "max_connection_age_grace_s": args.max_connection_age_grace,
        "keepalive_time_s": args.keepalive_time,
        "keepalive_timeout_s": args.keepalive_timeout,
        "min_ping_interval_s": args.min_ping_interval,
    }
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")
    if args.config:
        if args.model:
            raise ValueError("give models either in --config or with --model, not both")
        if args.decode:
            raise ValueError('--decode applies to --model; in a --config file, set decode = "fast" per model')
        return load_toml(args.config, **overrides)
    knobs: dict[str, Any] = {
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_ms": args.max_queue_delay_ms,
        "max_queue_size": args.max_queue_size,
        "instances": args.instances,
        "intra_op_threads": args.intra_op_threads,
        "allow_spinning": args.allow_spinning,
        "decode": args.decode or "exact",
    }
    if args.synsets:
        knobs["synsets"] = args.synsets
    specs = args.model or [f"{zoo.DEFAULT_MODEL.name}={_default_model()}"]
    if args.name and len(specs) > 1:
        raise ValueError("--name applies to a single --model; use NAME=PATH for several")
    models = []
    for spec in specs:
        name, path = _split_model_spec(spec)
        path = _model_file(path)
        models.append(ModelConfig(name=args.name or name or Path(path).stem, path=path, **knobs))
    return ServerConfig(models=tuple(models), **{k: v for k, v in overrides.items() if v is not None})


def _workers(text: str) -> int:
    """`--workers N` or `auto` (0)."""
    if text == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (or 'auto'), got {value}")
    return value


def _split_model_spec(spec: str) -> tuple[str | None, str]:
    """'NAME=PATH', or a bare 'PATH' (None: named after its model file, without '.onnx')."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name:
        return name, path
    return None, spec


def _model_file(path: str) -> str:
    """PATH itself, or for a folder the one `*.onnx` file in it: what an orchestrator mounts, such
    as KServe's storage initializer at /mnt/models, is a folder whose file name it does not fix."""
    if Path(path).is_dir():
        found = sorted(p.name for p in Path(path).glob("*.onnx") if p.is_file())
        if len(found) != 1:
            what = "no .onnx file" if not found else f"{len(found)} .onnx files ({', '.join(found)})"
            raise ValueError(f"model folder {path} holds {what}: it must hold exactly one, or name the file")
        return str(Path(path) / found[0])
    if not Path(path).is_file():
        raise ValueError(f"model file not found: {path}")
    return path


def _default_model() -> Path:
    """The zoo's int8 model in the models folder, pulled first if missing."""
    path = zoo.DEFAULT_MODELS_DIR / zoo.DEFAULT_MODEL.filename
    if not path.is_file():
        source = os.environ.get(zoo.MIRROR_ENV) or "the ONNX model zoo"
        print(f"mobiserve: {path} is missing; pulling it from {source} (sha256-checked) ...", file=sys.stderr)
        try:
            zoo.pull(zoo.DEFAULT_MODEL)
        except zoo.ZooError as exc:
            raise ValueError(str(exc)) from None
    return path
