"""`mobiserve evaluate` and `mobiserve quantize` (issue 6)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this module's subcommands to the `mobiserve` parser."""
