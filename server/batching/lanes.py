"""A model's lanes: one queue per class of work, each with its own room, batch cap and share.

Lanes are listed most urgent first. The batcher (batcher.py) decides which lane a free session
serves; this module keeps what each lane holds: its queue, the room its admitted items take, the
callers waiting for room, and the inference time it used lately (for the share guard).

Everything here runs on the batcher's event loop: no locks.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

P = TypeVar("P")  # a queued item, as the batcher keeps it

SHARE_HORIZON_S = 1.0  # the share guard looks at about this much recent inference time


@dataclass(frozen=True)
class Lane:
    """How one class of work is admitted and batched."""

    name: str
    max_queue_size: int = 0  # items admitted and not yet in a batch (0: unbounded)
    max_batch_size: int = 0  # items per batch at most (0: the model's max_batch_size)
    # of the sessions' recent time, guaranteed while it has work whatever more urgent lanes want
    min_share: float = 0.0

    def __post_init__(self) -> None:
        if self.max_queue_size < 0 or self.max_batch_size < 0 or not 0 <= self.min_share <= 1:
            raise ValueError(f"lane {self.name!r}: sizes must be >= 0 and min_share in [0, 1]")


class LaneQueue(Generic[P]):
    """One lane's state: its queue, the room its admitted items hold, and who waits for room.

    Room is reserved at arrival and given back as items join a batch (or leave). A caller that may
    wait (a stream's message) queues for room in arrival order; others are refused when the lane
    is full. A request larger than the whole lane is let in when the lane is empty, so waiting
    never deadlocks on one big request."""

    def __init__(self, spec: Lane, index: int):
        self.spec = spec
        self.index = index
        self.items: deque[P] = deque()
        self.admitted = 0  # items reserved and not yet in a batch
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._room = asyncio.Event()
        self._room.set()
        self.used_s = 0.0  # recent inference time, decayed with SHARE_HORIZON_S

    @property
    def name(self) -> str:
        return self.spec.name

    def has_room(self) -> bool:
        """Room for at least one more item, with no one waiting ahead."""
        limit = self.spec.max_queue_size
        return not self._waiting and (not limit or self.admitted < limit)

    async def room(self) -> None:
        """Until the lane has room for one more item: a stream waits here before reading on."""
        while not self.has_room():
            await self._room.wait()

    def fits(self, count: int) -> bool:
        limit = self.spec.max_queue_size
        return not self._waiting and (not limit or self.admitted + count <= limit or self.admitted == 0)

    def take(self, count: int) -> None:
        self.admitted += count
        self._update()

    async def take_when_room(self, count: int) -> None:
        """Reserve room for `count` items, waiting in line for it."""
        if self.fits(count):
            self.take(count)
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((count, granted))
        self._update()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # granted just as its caller gave up
                self.release(count)
            raise
        finally:
            self._wake()

    def release(self, count: int) -> None:
        self.admitted -= count
        self._wake()

    def record(self, seconds: float, decay: float) -> None:
        self.used_s = self.used_s * decay + seconds

    def _wake(self) -> None:
        """Grant waiting callers room, in arrival order, while it lasts."""
        limit = self.spec.max_queue_size
        while self._waiting:
            count, granted = self._waiting[0]
            if granted.done():  # gave up waiting
                self._waiting.popleft()
                continue
            if limit and self.admitted + count > limit and self.admitted > 0:
                break
            self._waiting.popleft()
            self.admitted += count
            granted.set_result(None)
        self._update()

    def _update(self) -> None:
        if self.has_room():
            self._room.set()
        else:
            self._room.clear()


def decay(elapsed_s: float) -> float:
    """How much of the usage recorded `elapsed_s` ago still counts."""
    return math.exp(-max(0.0, elapsed_s) / SHARE_HORIZON_S)
