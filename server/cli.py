"""`mobiserve serve`: run the gRPC server (needs the server extra)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mobiserve.common import zoo
from mobiserve.common.command import fail, missing
from mobiserve.server.config import ModelConfig, ServerConfig, default_of  # standard library only: for the help

if TYPE_CHECKING:
    from mobiserve.common.command import Subcommands

log = logging.getLogger("mobiserve.server")
# What `serve` imports beyond the thin client: checked first, so a missing extra is one line.
SERVER_MODULES = ("onnxruntime", "simplejpeg", "PIL", "prometheus_client", "grpc_health", "grpc_reflection")


def register(sub: Subcommands) -> None:
    """Add `serve` to the `mobiserve` parser (an entry point of the `mobiserve.commands` group)."""
    _add_serve(sub)


# ---------------------------------------------------------------------------------------- serve


def _add_serve(sub: Subcommands) -> None:
    # every default shown comes from the dataclasses that set it (server/config.py)
    server, model = functools.partial(_default, ServerConfig), functools.partial(_default, ModelConfig)
    p = sub.add_parser("serve", help="run the gRPC server", description="Serve ONNX image classifiers over gRPC.")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file listing models and server settings (docs/operations.md); server flags override "
        "its [server] table, and per-model settings go in its [[models]] tables",
    )
    p.add_argument(
        "--model",
        action="append",
        metavar="[NAME=]PATH",
        help="ONNX model to serve; repeat for several (the first is the default); "
        "a bare PATH is named after its file; a folder means the one *.onnx file in it "
        f"(default: the zoo's {zoo.DEFAULT_MODEL.name} model, pulled into {zoo.DEFAULT_MODELS_DIR}/ if missing)",
    )
    p.add_argument("--name", help="name of the model when a single --model is given (default: its file name)")
    m = p.add_argument_group("per model", "with --model; with --config, set them in each [[models]] table")
    m.add_argument(
        "--synsets",
        metavar="FILE",
        help="labels file, '<wnid> <name>' per line in output order (default: ImageNet-1k, shipped with mobiserve)",
    )
    m.add_argument(
        "--max-batch-size",
        type=int,
        metavar="N",
        help=f"images per onnxruntime run at most ({model('max_batch_size')})",
    )
    m.add_argument(
        "--max-queue-delay-ms",
        type=float,
        metavar="MS",
        help="let a batch fill for up to this long after its first image "
        f"({model('max_queue_delay_ms', zero='never wait')})",
    )
    m.add_argument(
        "--max-queue-size",
        type=int,
        metavar="N",
        help="images waiting per model before new work is refused with RESOURCE_EXHAUSTED "
        f"({model('max_queue_size', zero='no limit')})",
    )
    m.add_argument(
        "--instances",
        type=int,
        metavar="N",
        help=f"onnxruntime sessions per model ({model('instances', zero='one per 4 cores')})",
    )
    m.add_argument(
        "--intra-op-threads",
        type=int,
        metavar="N",
        help=f"threads per session ({model('intra_op_threads', zero='the cores divided among the instances')})",
    )
    m.add_argument(
        "--lone-threads",
        type=int,
        metavar="N",
        help="threads of the all-core path, which interactive work takes while the server's other cores are "
        f"idle ({model('lone_threads', zero='all cores of the server, at most 4')})",
    )
    m.add_argument(
        "--allow-spinning",
        action="store_true",
        default=None,
        help=f"let onnxruntime threads spin between batches ({model('allow_spinning')})",
    )
    m.add_argument(
        "--decode",
        choices=("exact", "fast"),
        help="fast: decode large JPEGs at 1/2-1/8 scale, several times cheaper and no longer bit-exact "
        f"(docs/performance.md#large-photos; {model('decode')})",
    )
    m.add_argument(
        "--default-priority-level",
        type=int,
        metavar="N",
        help="priority level of a request that asks for none: 1 interactive, 2 bulk "
        f"({model('default_priority_level', zero='by RPC, unary calls interactive, streams bulk')})",
    )
    m.add_argument(
        "--bulk-max-batch-size",
        type=int,
        metavar="N",
        help=f"images per bulk batch at most ({model('bulk_max_batch_size')})",
    )
    m.add_argument(
        "--bulk-max-queue-size",
        type=int,
        metavar="N",
        help="bulk images waiting per model; a stream whose bulk lane is full is not read until there is room "
        f"({model('bulk_max_queue_size', zero='no limit')})",
    )
    m.add_argument(
        "--bulk-min-share",
        type=float,
        metavar="F",
        help=f"share of inference time bulk work keeps while it has work ({model('bulk_min_share')})",
    )
    p.add_argument("--host", help=f"address to bind ({server('host')})")
    p.add_argument("--port", type=_port, help=f"port to bind ({server('port', zero='pick a free one')})")
    p.add_argument(
        "--preprocess-threads",
        type=int,
        metavar="N",
        help="decode/resize threads per lane "
        f"({server('preprocess_threads', zero='twice the share of the cores of each worker, at most all of them')})",
    )
    p.add_argument(
        "--bulk-nice",
        type=int,
        metavar="N",
        help="bulk work's threads run at an OS priority lowered by this nice value "
        f"({server('bulk_nice', zero='as interactive work')})",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        metavar="N|auto",
        help="server processes sharing the port, each with its share of the cores "
        f"({server('workers', zero='one per core')}). Connections, not calls, are spread over them",
    )
    p.add_argument(
        "--pin-cpus",
        action="store_true",
        default=None,
        help=f"pin each worker to its share of the cores ({server('pin_cpus')})",
    )
    p.add_argument(
        "--max-images-per-request",
        type=int,
        metavar="N",
        help=f"images in one request at most ({server('max_images_per_request')})",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        help=f"largest image accepted, in pixels ({server('max_pixels')})",
    )
    p.add_argument(
        "--max-message-mb",
        type=float,
        metavar="MB",
        help=f"largest gRPC message, in MiB (default {default_of(ServerConfig, 'max_message_bytes') / MIB:g})",
    )
    p.add_argument(
        "--default-timeout",
        type=float,
        metavar="S",
        help=f"seconds, for calls without a deadline ({server('default_timeout_s')})",
    )
    p.add_argument("--grace-period", type=float, metavar="S", help=f"seconds to drain on SIGTERM ({server('grace_s')})")
    p.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help=f"serve Prometheus metrics on this port ({server('metrics_port', zero='none')})",
    )
    p.add_argument(
        "--expose-model-paths",
        action="store_true",
        default=None,
        help="ListModels reports each model's full path on this machine, not only its file name "
        f"({server('expose_model_paths')})",
    )
    c = p.add_argument_group("connections", "idle and age limits, keepalive pings (seconds; see docs/operations.md)")
    c.add_argument(
        "--max-connection-idle",
        type=float,
        metavar="S",
        help=f"close a connection without calls ({server('max_connection_idle_s', zero='never')})",
    )
    c.add_argument(
        "--max-connection-age",
        type=float,
        metavar="S",
        help="close every connection this old with GOAWAY, so clients reconnect and rebalance "
        f"({server('max_connection_age_s', zero='never')})",
    )
    c.add_argument(
        "--max-connection-age-grace",
        type=float,
        metavar="S",
        help="after that GOAWAY, cut calls still running on it "
        f"({server('max_connection_age_grace_s', zero='wait for them')})",
    )
    c.add_argument(
        "--keepalive-time",
        type=float,
        metavar="S",
        help=f"ping a connection silent this long ({server('keepalive_time_s')})",
    )
    c.add_argument(
        "--keepalive-timeout",
        type=float,
        metavar="S",
        help=f"close it when a ping is unanswered this long ({server('keepalive_timeout_s')})",
    )
    c.add_argument(
        "--min-ping-interval",
        type=float,
        metavar="S",
        help=f"shortest client ping interval allowed, with or without calls ({server('min_ping_interval_s')})",
    )
    t = p.add_argument_group("TLS", "PEM files; docs/operations.md shows how to make them")
    t.add_argument("--tls-cert", metavar="PEM", help="server certificate; enables TLS (default: plaintext)")
    t.add_argument("--tls-key", metavar="PEM", help="its private key")
    t.add_argument(
        "--tls-client-ca", metavar="PEM", help="CA that client certificates must chain to; enables mutual TLS"
    )
    p.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(default: %(default)s)"
    )
    p.set_defaults(func=_serve)


MIB = 1 << 20
# The flags that set a model's knobs: with --config, the file's [[models]] tables do.
MODEL_FLAGS = {
    "synsets": "--synsets",
    "max_batch_size": "--max-batch-size",
    "max_queue_delay_ms": "--max-queue-delay-ms",
    "max_queue_size": "--max-queue-size",
    "instances": "--instances",
    "intra_op_threads": "--intra-op-threads",
    "lone_threads": "--lone-threads",
    "allow_spinning": "--allow-spinning",
    "decode": "--decode",
    "default_priority_level": "--default-priority-level",
    "bulk_max_batch_size": "--bulk-max-batch-size",
    "bulk_max_queue_size": "--bulk-max-queue-size",
    "bulk_min_share": "--bulk-min-share",
}


class UsageError(ValueError):
    """Flags that do not go together: exit status 2, as argparse's own usage errors."""


def _default(cls: type[Any], name: str, zero: str = "") -> str:
    """ "default 32", or with what 0 means: "default 0: never" / "default 300; 0: never"."""
    value = default_of(cls, name)
    if isinstance(value, bool):
        return f"default: {'on' if value else 'off'}"
    text = f"default {value:g}" if isinstance(value, float) else f"default {value}"
    if not zero:
        return text
    return f"{text}: {zero}" if value == 0 else f"{text}; 0: {zero}"


def _serve(args: argparse.Namespace) -> int:
    if hint := missing("server", *SERVER_MODULES, "msgspec"):
        return fail(hint)
    from mobiserve.server import logs, workers

    try:
        config = _server_config(args)
    except UsageError as exc:
        return fail(str(exc), 2)
    except (ValueError, OSError) as exc:
        return fail(str(exc))
    logs.configure(args.log_level)
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
    from mobiserve.server.config import load_toml

    overrides = {
        "host": args.host,
        "port": args.port,
        "preprocess_threads": args.preprocess_threads,
        "bulk_nice": args.bulk_nice,
        "workers": args.workers,
        "pin_cpus": args.pin_cpus,
        "max_images_per_request": args.max_images_per_request,
        "max_pixels": args.max_pixels,
        "max_message_bytes": None if args.max_message_mb is None else int(args.max_message_mb * MIB),
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
        raise UsageError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise UsageError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key too")
    knobs: dict[str, Any] = {key: getattr(args, key) for key in MODEL_FLAGS if getattr(args, key) is not None}
    if args.config:
        if args.model or args.name:
            raise UsageError("give models either in --config or with --model, not both")
        if knobs:
            flags = ", ".join(MODEL_FLAGS[key] for key in knobs)
            raise UsageError(f"{flags} set a --model's knobs; with --config, set them in each [[models]] table")
        return load_toml(args.config, **overrides)
    specs = args.model or [f"{zoo.DEFAULT_MODEL.name}={_default_model()}"]
    if args.name and len(specs) > 1:
        raise UsageError("--name applies to a single --model; use NAME=PATH for several")
    models = []
    for spec in specs:
        name, path = _split_model_spec(spec)
        path = _model_file(path)
        models.append(ModelConfig(name=args.name or name or Path(path).stem, path=path, **knobs))
    return ServerConfig(models=tuple(models), **{k: v for k, v in overrides.items() if v is not None})


def _port(text: str) -> int:
    """A port number, 0 to 65535 (0: the server picks one, or no metrics endpoint)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {value}")
    return value


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
