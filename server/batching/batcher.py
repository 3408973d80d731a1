"""One asyncio dynamic batcher per model.

While every session is busy, submitted items accumulate; as soon as a session is free it takes
everything queued (up to `max_batch_size` items) at once. With no queue delay configured an idle
server therefore adds no wait to a lone request; `max_queue_delay_s` lets a batch fill for at most
that long after its first item arrived. Items, not requests, are the unit: a request's images may
share a batch with other requests' images and may span several batches.

Everything here runs on one event loop, so the queue, counters and the wake-up event need no
locks: between two awaits nothing else touches them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from mobiserve.server.errors import DeadlineExceeded, InferenceFailed, InvalidInput, Overloaded, Unavailable

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batched(Generic[R]):
    """One item's result and how it got there."""

    value: R
    queue_s: float  # submitted until its batch started
    inference_s: float  # the batch's run
    batch_size: int


class Admission:
    """Queue capacity reserved for one request's items, from arrival until they join a batch.

    Reserving before preprocessing means an overloaded server refuses work before spending CPU on
    it. Use as a context manager: whatever was not consumed by a batch is released on exit.
    """

    def __init__(self, batcher: Batcher[T, R], count: int):  # type: ignore[type-var]
        self._batcher = batcher
        self.remaining = count

    def consume(self, count: int = 1) -> None:
        count = min(count, self.remaining)
        self.remaining -= count
        self._batcher.admitted -= count

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.consume(self.remaining)


@dataclass
class _Pending(Generic[T, R]):
    item: T
    admission: Admission
    future: asyncio.Future[Batched[R]]
    enqueued: float
    deadline: float | None = field(default=None)


def _set_result(future: asyncio.Future[R], value: R) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[R], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class Batcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        concurrency: int = 1,
        max_queue_size: int = 0,
        name: str = "",
        on_batch: Callable[[int, float], None] | None = None,
    ):
        if max_batch_size < 1 or concurrency < 1:
            raise ValueError("max_batch_size and concurrency must be >= 1")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size  # images; 0 = unbounded
        self.admitted = 0  # images reserved and not yet in a batch
        self._run_batch = run_batch
        self._on_batch = on_batch
        self._queue: deque[_Pending[T, R]] = deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._running: set[asyncio.Task[None]] = set()
        self._closing = False
        self._loop_task: asyncio.Task[None] | None = None

    async def claim_if_idle(self) -> bool:
        """Take a session slot for one item that skips the queue, if nothing is admitted or
        queued and a slot is free: then it overtakes no one. Give it back with `release()`."""
        if self._closing or self.admitted or self._queue or self._slots.locked():
            return False
        await self._slots.acquire()  # free: returns without suspending
        return True

    def release(self) -> None:
        self._slots.release()

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher:{self.name}")

    def admit(self, count: int) -> Admission:
        """Reserve room for `count` items or refuse at once (Overloaded)."""
        if self._closing:
            raise Unavailable("the server is shutting down")
        limit = self.max_queue_size
        if limit and count > limit:
            raise InvalidInput(
                f"request has {count} images, more than the queue limit of {limit} for model {self.name!r}"
            )
        if limit and self.admitted + count > limit:
            raise Overloaded(
                f"model {self.name!r} is overloaded: {self.admitted} images queued, limit {limit}; retry later"
            )
        self.admitted += count
        return Admission(self, count)

    async def submit(self, admission: Admission, items: Sequence[T], deadline: float | None = None) -> list[Batched[R]]:
        """Queue items and wait for their results, in order. `deadline` is on the loop's clock."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = [_Pending(item, admission, loop.create_future(), now, deadline) for item in items]
        self._queue.extend(pending)
        self._arrived.set()
        try:
            return list(await asyncio.gather(*(p.future for p in pending)))
        except BaseException:
            # caller cancelled or one item failed: the rest leave the queue (skipped when drained)
            for p in pending:
                p.future.cancel()
            raise

    async def close(self) -> None:
        """Run everything already queued, then stop. Call after the transport stopped taking work."""
        self._closing = True
        self._arrived.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _loop(self) -> None:
        while (batch := await self._next_batch()) is not None:
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    async def _next_batch(self) -> list[_Pending[T, R]] | None:
        """Block for the first item and a free session slot, wait out what is left of the
        window, drain without awaiting. Returns holding the slot; None once closed and empty."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                if self._closing:
                    return None
                self._arrived.clear()  # only cleared when the queue is empty: no lost wake-up
                await self._arrived.wait()
            await self._slots.acquire()
            if self.max_queue_delay_s > 0 and not self._closing:
                window_end = self._queue[0].enqueued + self.max_queue_delay_s if self._queue else loop.time()
                while len(self._queue) < self.max_batch_size and (left := window_end - loop.time()) > 0:
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), left)
                    except TimeoutError:
                        break
            batch = self._drain(loop.time())
            if batch:
                return batch
            self._slots.release()  # everything queued had gone away meanwhile

    def _drain(self, now: float) -> list[_Pending[T, R]]:
        batch: list[_Pending[T, R]] = []
        while self._queue and len(batch) < self.max_batch_size:
            p = self._queue.popleft()
            p.admission.consume()
            if p.future.done():  # cancelled caller, or a sibling item already failed
                continue
            if p.deadline is not None and now >= p.deadline:
                _set_exception(p.future, DeadlineExceeded("deadline passed while queued; not run"))
                continue
            batch.append(p)
        return batch

    async def _run(self, batch: list[_Pending[T, R]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            results = await self._run_batch([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the model returned {len(results)} results for a batch of {len(batch)}")
        except Exception as exc:
            log.error(
                "event=batch_failed model=%s batch_size=%d reason=%r", self.name, len(batch), str(exc), exc_info=exc
            )
            failure = InferenceFailed(f"inference failed for this batch: {exc}")
            for p in batch:
                _set_exception(p.future, failure)
        else:
            took = loop.time() - started
            if self._on_batch is not None:
                self._on_batch(len(batch), took)
            for p, value in zip(batch, results):
                _set_result(p.future, Batched(value, started - p.enqueued, took, len(batch)))
        finally:
            self._slots.release()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event=batch_task_crashed model=%s", self.name, exc_info=task.exception())
