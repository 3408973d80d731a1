"""A worker's side of `mobiserve serve --workers N` (the supervisor is `workers.py`): it says when
it listens and when it serves, and turns SERVING only once every worker listens, so that health
says NOT_SERVING until the whole server can take its load."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Handshake:
    """This process is worker `index` of its supervisor."""

    index: int
    all_ready: Any  # a multiprocessing Event the supervisor sets once every worker listens
    ready: Any  # a multiprocessing Queue: (index, "ready") once it listens, (index, "serving") once SERVING

    def listening(self) -> None:
        self.ready.put((self.index, "ready"))

    async def all_listening(self) -> None:
        """Return once the supervisor says every worker listens (without blocking the event loop)."""
        loop = asyncio.get_running_loop()
        while not await loop.run_in_executor(None, self.all_ready.wait, 0.5):
            pass

    def serving(self) -> None:
        self.ready.put((self.index, "serving"))
