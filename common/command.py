"""The `mobiserve` command. Each installed part adds its own subcommands through an entry point
in the `mobiserve.commands` group (a `register(subparsers)` function), so no part imports
another's commands: the thin client install has `classify`, `validate`, `models` and `health`;
the server's and the harness's commands are there too and, run without their extra, say what
to install."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from mobiserve import __version__

COMMANDS_GROUP = "mobiserve.commands"

if TYPE_CHECKING:
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]  # what each part's `register` gets


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    finally:
        # Collect a failed stream's reference cycles while gRPC's threads still run: collected
        # at interpreter exit instead, grpc's Rendezvous.__del__ can wait forever on a lock held
        # by a daemon thread that exit froze (seen once under load).
        gc.collect()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobiserve", description="MobileNetV2 image classification over gRPC.")
    parser.add_argument("--version", action="version", version=f"mobiserve {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")
    for point in entry_points(group=COMMANDS_GROUP):  # in the order pyproject.toml lists them
        point.load()(sub)
    return parser


def fail(message: str, code: int = 1) -> int:
    """One line on stderr and a non-zero exit: what every command does on a user-facing error."""
    print(f"mobiserve: error: {message}", file=sys.stderr)
    return code


def missing(extra: str, *modules: str) -> str | None:
    """None when `modules` are importable, else the one-line hint to install `extra`."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    return f"this command needs the {extra} extra ({', '.join(absent)} not installed): pip install 'mobiserve[{extra}]'"
