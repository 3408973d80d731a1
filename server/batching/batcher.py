"""One asyncio dynamic batcher per model: the only way from a request to the model.

A request's inputs are admitted (queue room reserved, or refused at once), prepared one by one
(validated and preprocessed, so a bad input fails alone and never joins a batch), queued, and
answered when the batches that carried them have run. While every session is busy, prepared
items accumulate; as soon as a session is free it takes everything queued (up to
`max_batch_size` items) at once. With no queue delay configured an idle model therefore adds no
wait to a lone request; `max_queue_delay_s` lets a batch fill for at most that long after its
first item arrived. Items, not requests, are the unit: a request's inputs may share a batch with
other requests' inputs and may span several batches.

An idle model (nothing admitted or queued, a session free) runs a lone input in one trip
(`Stages.run_alone`: prepare and run together), skipping the queue and a thread handoff; it
holds a session slot like any batch, so work arriving meanwhile queues behind it.

Everything here runs on one event loop, so the queue, counters and the wake-up event need no
locks: between two awaits nothing else touches them.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mobiserve.server.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    MobiserveError,
    Overloaded,
    Unavailable,
)

I = TypeVar("I")  # noqa: E741  (an input, as a request carries it)
T = TypeVar("T")  # an item ready to join a batch
R = TypeVar("R")  # one item's result
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stages(Generic[I, T, R]):
    """The work the batcher schedules. Each stage runs off the event loop and is awaited here."""

    prepare: Callable[[int, I, float | None], Awaitable[T]]  # (index, input, deadline) -> item
    run_batch: Callable[[list[T]], Awaitable[Sequence[R]]]  # items -> one result each, in order
    # an idle model's lone input, prepared and run in one trip -> (result, seconds spent preparing)
    run_alone: Callable[[I, float | None], Awaitable[tuple[R, float]]] | None = None


@dataclass(frozen=True)
class Answered(Generic[R]):
    """A request's results, in input order, and where its time went."""

    values: list[R]
    preprocess_s: float  # preparing all its inputs (concurrently)
    queue_s: float  # the longest wait of its items, from queued until their batch started
    inference_s: float  # the run time of the batches that carried it, each counted once
    batch_size: int  # the largest of those batches


class Admission:
    """Queue capacity reserved for one request's items, from arrival until they join a batch.

    Reserving before preprocessing means an overloaded server refuses work before spending CPU on
    it. Use as a context manager: whatever was not consumed by a batch is released on exit.
    """

    def __init__(self, batcher: Batcher[Any, Any, Any], count: int):
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


@dataclass(frozen=True)
class _Run:
    started: float
    took: float
    size: int


@dataclass
class _Pending(Generic[T, R]):
    item: T
    admission: Admission
    future: asyncio.Future[tuple[R, _Run]]
    enqueued: float
    deadline: float | None = field(default=None)


def _expired(p: _Pending[T, R], now: float) -> bool:
    """Its deadline has passed: it fails with DEADLINE_EXCEEDED and is not run."""
    if p.deadline is None or now < p.deadline:
        return False
    _set_exception(p.future, DeadlineExceeded("deadline passed while queued; not run"))
    return True


def _set_result(future: asyncio.Future[R], value: R) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[R], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class Batcher(Generic[I, T, R]):
    def __init__(
        self,
        stages: Stages[I, T, R],
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
        self.max_queue_size = max_queue_size  # items; 0 = unbounded
        self.admitted = 0  # items reserved and not yet in a batch
        self._stages = stages
        self._on_batch = on_batch
        self._queue: deque[_Pending[T, R]] = deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._running: set[asyncio.Task[None]] = set()
        self._closing = False
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher:{self.name}")

    @property
    def waiting(self) -> int:
        """Items prepared and queued for a batch (a gone caller's are skipped when drained)."""
        return len(self._queue)

    async def submit(self, inputs: Sequence[I], deadline: float | None = None) -> Answered[R]:
        """Admit, prepare and queue `inputs`, and wait for their results. `deadline` is on the
        loop's clock. Raises Overloaded (queue full) or Unavailable (closing) before any work."""
        loop = asyncio.get_running_loop()
        if len(inputs) == 1 and self._stages.run_alone is not None and await self._claim_if_idle():
            try:
                return await self._alone(inputs[0], deadline)
            finally:
                self._slots.release()
        with self._admit(len(inputs)) as admission:
            started = loop.time()
            items = await asyncio.gather(*(self._stages.prepare(i, x, deadline) for i, x in enumerate(inputs)))
            preprocess_s = loop.time() - started
            now = loop.time()
            pending = [_Pending(item, admission, loop.create_future(), now, deadline) for item in items]
            self._queue.extend(pending)
            self._arrived.set()
            try:
                done = await asyncio.gather(*(p.future for p in pending))
            except BaseException:
                # caller cancelled or one item failed: the rest leave the queue (skipped when drained)
                for p in pending:
                    p.future.cancel()
                raise
        runs = {id(run): run for _, run in done}.values()
        return Answered(
            values=[value for value, _ in done],
            preprocess_s=preprocess_s,
            queue_s=max(run.started - p.enqueued for p, (_, run) in zip(pending, done)),
            inference_s=sum(run.took for run in runs),
            batch_size=max(run.size for run in runs),
        )

    async def close(self) -> None:
        """Run everything already queued, then stop. Call after the transport stopped taking work."""
        self._closing = True
        self._arrived.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def _admit(self, count: int) -> Admission:
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

    async def _claim_if_idle(self) -> bool:
        """Take a session slot for a lone input that skips the queue, if nothing is admitted or
        queued and a slot is free: then it overtakes no one."""
        if self._closing or self.admitted or self._queue or self._slots.locked():
            return False
        await self._slots.acquire()  # free: returns without suspending
        return True

    async def _alone(self, value: I, deadline: float | None) -> Answered[R]:
        assert self._stages.run_alone is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            result, preprocess_s = await self._stages.run_alone(value, deadline)
        except MobiserveError:
            raise  # the input's own fault (or its deadline): it fails alone, as in `prepare`
        except Exception as exc:
            raise self._failed(1, exc) from None
        took = loop.time() - started - preprocess_s
        if self._on_batch is not None:
            self._on_batch(1, took)
        return Answered([result], preprocess_s, 0.0, took, 1)

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
            if _expired(p, now):
                continue
            batch.append(p)
        return batch

    async def _run(self, batch: list[_Pending[T, R]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        # the last look before inference: callers may have gone or expired since the batch formed
        batch = [p for p in batch if not p.future.done() and not _expired(p, started)]
        if not batch:
            self._slots.release()
            return
        try:
            results = await self._stages.run_batch([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the model returned {len(results)} results for a batch of {len(batch)}")
        except Exception as exc:
            failure = self._failed(len(batch), exc)
            for p in batch:
                _set_exception(p.future, failure)
        else:
            run = _Run(started, loop.time() - started, len(batch))
            if self._on_batch is not None:
                self._on_batch(run.size, run.took)
            for p, value in zip(batch, results):
                _set_result(p.future, (value, run))
        finally:
            self._slots.release()

    def _failed(self, size: int, exc: Exception) -> InferenceFailed:
        log.error("event=batch_failed model=%s batch_size=%d reason=%r", self.name, size, str(exc), exc_info=exc)
        return InferenceFailed(f"inference failed for this batch: {exc}")

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event=batch_task_crashed model=%s", self.name, exc_info=task.exception())
