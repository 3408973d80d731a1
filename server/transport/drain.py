"""Which calls a draining server still serves, and when its port may close.

At drain() the server has work it accepted, and under load a backlog of calls that reached it
before the signal but that the event loop has not dispatched yet. gRPC gives no arrival time, so
the rule is: while any call that was in flight at drain() is still running, the server is still
catching up and serves new unary calls too; once those are done, new calls are refused with
UNAVAILABLE (nothing of them was done: safe to retry elsewhere). Streams are never started during
a drain. The port may close once nothing is in flight and no call arrived for `quiet_s`: gRPC core
cancels the calls it holds undelivered when it shuts down (CANCELLED, which clients do not retry),
so the app must see each client's next call first and refuse it cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

DRAIN_QUIET_S = 0.25


class CallGate:
    """Counts calls in flight. Use on the event loop only (no locks needed)."""

    def __init__(self, quiet_s: float = DRAIN_QUIET_S):
        self.quiet_s = quiet_s
        self.draining = False  # drain() was called: streams end, no new stream starts
        self.refusing = False  # new unary calls are refused: set once the calls of before drain() are done
        self._calls = 0
        self._before_drain = 0  # calls in flight at drain() and still running
        self._last_arrival = 0.0
        self._idle = asyncio.Event()

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Wrap the handling of one call, from its arrival to its answer."""
        before_drain = not self.draining
        self._calls += 1
        self._last_arrival = time.monotonic()
        try:
            yield
        finally:
            self._calls -= 1
            if self.draining and before_drain:
                self._before_drain -= 1
                self.refusing = self.refusing or self._before_drain == 0
            if not self._calls:
                self._idle.set()

    def drain(self) -> None:
        self.draining = True
        self._before_drain = self._calls
        self.refusing = self._calls == 0

    async def wait_quiet(self) -> None:
        """After drain(): return once no call is in flight and none arrived for `quiet_s`."""
        while True:
            while self._calls:
                self._idle.clear()
                await self._idle.wait()
            left = self._last_arrival + self.quiet_s - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(left)
