"""How a draining server refuses new calls, and when it closes its port.

gRPC core fails the calls it holds undelivered when the server stops with CANCELLED, which
clients do not retry. Under load it always holds some: calls that reached the
process while the event loop was busy, or whose message is still arriving. And a client that is
answered while the port is still open sends its next call (or its retry) straight back. So at
drain():

1. A call that reaches the servicer from now on is refused with UNAVAILABLE (nothing of it was
   done: safe to retry elsewhere). Open streams stop reading and answer what they read; unary
   calls in flight are answered. But every answer, and the end of every stream, waits for
   `close()`: a client waiting for its answer sends nothing new here.
2. Once no call has reached the servicer for `HANDOFF_GAP_S`, gRPC holds none: the app sends
   GOAWAY and closes the port (at the latest `HANDOFF_MAX_S` after drain(), however busy the
   clients are), then calls close(). The answers go out after the GOAWAY, so each client knows
   to send its next call elsewhere before it can send one.
3. The process exits as soon as every call that arrived before drain() is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

HANDOFF_GAP_S = 0.25  # covers a busy loop's delay in taking a call core holds, and calls still arriving
HANDOFF_MAX_S = 2.0  # a refused call waits no longer than this for the port to close


class CallGate:
    """Counts the servicer's calls in flight. Use on the event loop only (no locks needed)."""

    def __init__(self) -> None:
        self.draining = False  # drain() was called: new calls are refused, streams end
        self._accepted = 0  # calls in flight that arrived before drain()
        self._accepted_done = asyncio.Event()
        self._closed = asyncio.Event()
        self._last_arrival = 0.0

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Wrap the handling of one call, from its arrival to its answer."""
        accepted = not self.draining
        self._accepted += accepted
        self._last_arrival = time.monotonic()
        try:
            yield
        finally:
            self._accepted -= accepted
            if self.draining and not self._accepted:
                self._accepted_done.set()

    @property
    def idle(self) -> bool:
        """No call is being handled."""
        return not self._accepted

    def drain(self) -> None:
        self.draining = True
        self._last_arrival = max(self._last_arrival, time.monotonic())  # the gap counts from now at least
        if not self._accepted:
            self._accepted_done.set()

    async def port_closed(self, timeout: float | None = None) -> None:
        """Return once close() was called, or after `timeout` seconds."""
        if timeout is None:
            await self._closed.wait()
        elif timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), timeout)

    def close(self) -> None:
        """GOAWAY is sent and the port closed: the answers waiting in port_closed() go out."""
        self._closed.set()

    async def wait_handed_over(self, max_s: float = HANDOFF_MAX_S, gap_s: float = HANDOFF_GAP_S) -> None:
        """After drain(): return once no call arrived for `gap_s`, or after `max_s`."""
        end = time.monotonic() + max_s
        while (now := time.monotonic()) < end and (left := self._last_arrival + gap_s - now) > 0:
            await asyncio.sleep(min(left, end - now))

    async def wait_accepted(self) -> None:
        """After drain(): return once every call that arrived before it is answered."""
        await self._accepted_done.wait()
