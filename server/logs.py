"""The server's log lines: one event per line on stderr, `key=value` after the time and level."""

from __future__ import annotations

import logging
import sys


def configure(level: str, worker: int | None = None) -> None:
    """A worker of `--workers N` says which one it is on every line."""
    who = "" if worker is None else f" worker={worker}"
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s level=%(levelname)s logger=%(name)s{who} %(message)s",
        force=True,
    )
