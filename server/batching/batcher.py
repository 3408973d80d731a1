"""One asyncio dynamic batcher per model: the only way from a request to the model.

A request's inputs are admitted to their lane (queue room reserved, refused at once, or, for a
caller that may wait, waited for), prepared one by one (validated and preprocessed, so a bad
input fails alone and never joins a batch), queued in their lane, and answered when the batches
that carried them have run. Items, not requests, are the unit: a request's inputs may share a
batch with other requests' inputs and may span several batches. A batch holds one lane's items.

Which lane a free session serves (`_choose`): the most urgent lane with queued work, unless a
less urgent one has work and has had less than its `min_share` of the regular sessions' recent
time (the share guard: a flood of urgent work cannot stop the rest for ever). Each lane caps its batches
(`Lane.max_batch_size`), so urgent work waits for at most one capped batch per session; `spare`
sessions serve only the most urgent lane, and only while regular sessions run less urgent
batches: urgent work need not wait for those at all, and waits for its own lane's batches as
it would for any session (on a worker's one core, a second batch of its own beside the first only
crowds it).

While sessions are busy, prepared items accumulate; as soon as a session is free it takes what
its lane has queued (up to the lane's cap) at once. With no queue delay configured an idle model
therefore adds no wait to a lone request; `max_queue_delay_s` lets a batch fill for at most that
long after its first item arrived.

An idle lane with a session it may use (nothing of its own admitted or queued) runs a lone input
in one trip (`Stages.run_alone`: prepare and run together), skipping the queue and a thread
handoff; it holds the session like any batch.

Everything here runs on one event loop, so the queues, counters and the wake-up event need no
locks: between two awaits nothing else touches them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mobiserve.server.batching.lanes import Lane, LaneQueue, decay
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
    """The work the batcher schedules. Each stage runs off the event loop and is awaited here;
    each is told the lane (its index) the work belongs to."""

    prepare: Callable[[int, I, float | None, int], Awaitable[T]]  # (index, input, deadline, lane) -> item
    run_batch: Callable[[list[T], int], Awaitable[Sequence[R]]]  # (items, lane) -> one result each, in order
    # an idle lane's lone input, prepared and run in one trip -> (result, seconds spent preparing)
    run_alone: Callable[[I, float | None, int], Awaitable[tuple[R, float]]] | None = None


@dataclass(frozen=True)
class Answered(Generic[R]):
    """A request's results, in input order, and where its time went."""

    values: list[R]
    preprocess_s: float  # preparing all its inputs (concurrently)
    queue_s: float  # the longest wait of its items, from queued until their batch started
    inference_s: float  # the run time of the batches that carried it, each counted once
    batch_size: int  # the largest of those batches
    lane: str  # the lane that served it


@dataclass(frozen=True)
class Ran:
    """A batch that ran (or a lone input): what the metrics record of it."""

    lane: str
    size: int
    seconds: float
    waits: tuple[float, ...]  # each item's time in its lane's queue
    guarded: bool  # served ahead of more urgent work because its lane was owed its share


class Admission:
    """Room reserved in one lane for a request's items, from arrival until they join a batch.

    Reserving before preprocessing means an overloaded server refuses work before spending CPU on
    it. Use as a context manager: whatever was not consumed by a batch is released on exit.
    """

    def __init__(self, lane: LaneQueue[Any], count: int):
        self._lane = lane
        self.remaining = count

    def consume(self, count: int = 1) -> None:
        count = min(count, self.remaining)
        self.remaining -= count
        self._lane.release(count)

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


REGULAR, SPARE = "regular", "spare"  # session slots: any lane's, or the most urgent lane's only


class Batcher(Generic[I, T, R]):
    def __init__(
        self,
        stages: Stages[I, T, R],
        *,
        max_batch_size: int,
        max_queue_delay_s: float = 0.0,
        concurrency: int = 1,
        lanes: Sequence[Lane] = (Lane("default"),),
        spare: int = 0,
        name: str = "",
        on_batch: Callable[[Ran], None] | None = None,
        clock: Callable[[], float] | None = None,
    ):
        """`concurrency` sessions serve any lane, `spare` more only the first (most urgent) one.
        `clock` times batches for the share guard (default: the event loop's)."""
        if max_batch_size < 1 or concurrency < 1 or spare < 0 or not lanes:
            raise ValueError("max_batch_size and concurrency must be >= 1, spare >= 0, and there must be a lane")
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.lanes = [LaneQueue[_Pending[T, R]](spec, i) for i, spec in enumerate(lanes)]
        self._stages = stages
        self._on_batch = on_batch
        self._clock = clock
        self._spare = spare
        self._free = {REGULAR: concurrency, SPARE: spare}
        self._behind = 0  # regular sessions running a less urgent lane's batch
        self._changed = asyncio.Event()  # work queued, a session freed, or closing
        self._running: set[asyncio.Task[None]] = set()
        self._closing = False
        self._loop_task: asyncio.Task[None] | None = None
        self._recorded_at: float | None = None

    @property
    def admitted(self) -> int:
        """Items reserved in all lanes and not yet in a batch."""
        return sum(lane.admitted for lane in self.lanes)

    @property
    def urgent_alone(self) -> bool:
        """No less urgent work than the first lane's is admitted or running: the most urgent
        lane has the model to itself (what decides whether its work may take all the cores)."""
        return self._behind == 0 and not any(lane.admitted for lane in self.lanes[1:])

    def lane_index(self, name: str) -> int:
        return next(lane.index for lane in self.lanes if lane.name == name)

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher:{self.name}")

    @property
    def waiting(self) -> int:
        """Items prepared and queued for a batch, in all lanes (a gone caller's are skipped when drained)."""
        return sum(len(lane.items) for lane in self.lanes)

    async def room(self, lane: int) -> None:
        """Until `lane` has room for another item (what a stream awaits before reading on)."""
        await self.lanes[lane].room()

    async def submit(
        self, inputs: Sequence[I], deadline: float | None = None, lane: int = 0, wait: bool = False
    ) -> Answered[R]:
        """Admit, prepare and queue `inputs` in `lane`, and wait for their results. `deadline` is on
        the loop's clock. A full lane refuses at once (Overloaded), or with `wait` is waited for;
        Unavailable while closing. Either way before any work."""
        loop = asyncio.get_running_loop()
        queue = self.lanes[lane]
        if len(inputs) == 1 and self._stages.run_alone is not None and (slot := self._claim_if_idle(lane)):
            try:
                return await self._alone(inputs[0], deadline, queue, slot)
            finally:
                self._release(slot, lane)
        with await self._admit(len(inputs), queue, wait) as admission:
            started = loop.time()
            items = await asyncio.gather(*(self._stages.prepare(i, x, deadline, lane) for i, x in enumerate(inputs)))
            preprocess_s = loop.time() - started
            now = loop.time()
            pending = [_Pending(item, admission, loop.create_future(), now, deadline) for item in items]
            queue.items.extend(pending)
            self._changed.set()
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
            lane=queue.name,
        )

    async def close(self) -> None:
        """Run everything already queued, then stop. Call after the transport stopped taking work."""
        self._closing = True
        self._changed.set()
        if self._loop_task is not None:
            await self._loop_task
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _admit(self, count: int, lane: LaneQueue[_Pending[T, R]], wait: bool) -> Admission:
        """Reserve room for `count` items in `lane`, or refuse at once (Overloaded), or wait for it."""
        if self._closing:
            raise Unavailable("the server is shutting down")
        limit = lane.spec.max_queue_size
        if wait:
            await lane.take_when_room(count)
            return Admission(lane, count)
        if limit and count > limit:
            raise InvalidInput(
                f"request has {count} images, more than the {lane.name} queue limit of {limit} for model {self.name!r}"
            )
        if not lane.fits(count):
            raise Overloaded(
                f"model {self.name!r} is overloaded: {lane.admitted} {lane.name} images queued, "
                f"limit {limit}; retry later"
            )
        lane.take(count)
        return Admission(lane, count)

    def _claim_if_idle(self, lane: int) -> str | None:
        """A session for a lone input that skips the queue, if its lane has nothing admitted or
        queued and the scheduler would give it a free session now: then it overtakes no one it
        should not."""
        queue = self.lanes[lane]
        if self._closing or queue.admitted or queue.items:
            return None
        slot = self._slot_for(lane, self._with_work() | {lane})
        if slot is not None:
            self._take(slot, lane)
        return slot

    async def _alone(self, value: I, deadline: float | None, lane: LaneQueue[_Pending[T, R]], slot: str) -> Answered[R]:
        assert self._stages.run_alone is not None
        loop = asyncio.get_running_loop()
        started, clock_started = loop.time(), self._now()
        try:
            result, preprocess_s = await self._stages.run_alone(value, deadline, lane.index)
        except MobiserveError:
            raise  # the input's own fault (or its deadline): it fails alone, as in `prepare`
        except Exception as exc:
            raise self._failed(1, exc) from None
        took = loop.time() - started - preprocess_s
        session_s = self._now() - clock_started if slot == REGULAR else 0.0
        self._record(lane, session_s, Ran(lane.name, 1, took, (0.0,), False))
        return Answered([result], preprocess_s, 0.0, took, 1, lane.name)

    # ----------------------------------------------------------------------------------- scheduling

    def _with_work(self) -> set[int]:
        return {lane.index for lane in self.lanes if lane.items}

    def _owed(self, candidates: set[int]) -> int | None:
        """The most urgent candidate lane below its guaranteed share of recent session time."""
        total = sum(lane.used_s for lane in self.lanes)
        for i in sorted(candidates):
            share = self.lanes[i].spec.min_share
            if share > 0 and self.lanes[i].used_s < share * total:
                return i
        return None

    def _choose(self, candidates: set[int]) -> int | None:
        """The lane a regular session serves next, among lanes with work."""
        if not candidates:
            return None
        first = min(candidates)
        owed = self._owed(candidates - {first})
        return first if owed is None else owed

    def _slot_for(self, lane: int, candidates: set[int]) -> str | None:
        """The free session `lane` would get now, with `candidates` the lanes that have work."""
        if self._free[REGULAR] > 0 and self._choose(candidates) == lane:
            return REGULAR
        if lane == 0 and self._spare_free():
            return SPARE
        return None

    def _next(self) -> tuple[int, str] | None:
        """The lane to serve and the session to serve it with, if any is free for work queued."""
        candidates = self._with_work()
        lane = self._choose(candidates) if self._free[REGULAR] > 0 else None
        if lane is not None:
            return lane, REGULAR
        if 0 in candidates and self._spare_free():
            return 0, SPARE
        return None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            wake_at = None
            chosen = self._next()
            if chosen is not None:
                lane, slot = chosen
                wake_at = self._window_end(self.lanes[lane])
                if wake_at <= now:
                    guarded = lane > 0 and any(i < lane for i in self._with_work())
                    batch = self._drain(self.lanes[lane], now)
                    if batch:
                        self._take(slot, lane)
                        task = asyncio.create_task(self._run(batch, self.lanes[lane], slot, guarded))
                        self._running.add(task)
                        task.add_done_callback(self._finished)
                    continue  # an empty batch: everything queued had gone away, and left the queue
            elif self._closing and not self._with_work():
                return
            # only cleared when nothing can be started now: on one loop, no wake-up is lost
            self._changed.clear()
            if wake_at is None:
                await self._changed.wait()
            else:
                try:
                    await asyncio.wait_for(self._changed.wait(), wake_at - now)
                except TimeoutError:
                    pass

    def _cap(self, lane: LaneQueue[_Pending[T, R]]) -> int:
        return min(lane.spec.max_batch_size or self.max_batch_size, self.max_batch_size)

    def _window_end(self, lane: LaneQueue[_Pending[T, R]]) -> float:
        """When the lane's next batch may start: at once, or when its head's queue delay is over."""
        if self.max_queue_delay_s <= 0 or self._closing or len(lane.items) >= self._cap(lane):
            return 0.0
        return lane.items[0].enqueued + self.max_queue_delay_s

    def _drain(self, lane: LaneQueue[_Pending[T, R]], now: float) -> list[_Pending[T, R]]:
        batch: list[_Pending[T, R]] = []
        cap = self._cap(lane)
        while lane.items and len(batch) < cap:
            p = lane.items.popleft()
            p.admission.consume()
            if p.future.done():  # cancelled caller, or a sibling item already failed
                continue
            if _expired(p, now):
                continue
            batch.append(p)
        return batch

    def _spare_free(self) -> bool:
        """A spare session may start a batch: one is free, and fewer are busy than regular sessions
        run less urgent batches. Spares exist so that urgent work never waits behind those; behind
        its own lane's batches it waits as it would for any session (more batches at once than the
        regular sessions' worth of cores would only crowd them)."""
        return self._free[SPARE] > 0 and self._spare - self._free[SPARE] < self._behind

    def _take(self, slot: str, lane: int) -> None:
        self._free[slot] -= 1
        if slot == REGULAR and lane > 0:
            self._behind += 1

    def _release(self, slot: str, lane: int) -> None:
        self._free[slot] += 1
        if slot == REGULAR and lane > 0:
            self._behind -= 1
        self._changed.set()

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _record(self, lane: LaneQueue[_Pending[T, R]], clock_s: float, ran: Ran) -> None:
        """A batch's time on a regular session (0 for a spare one), for the share guard, and its
        figures, for the metrics."""
        now = self._now()
        factor = decay(now - self._recorded_at) if self._recorded_at is not None else 1.0
        self._recorded_at = now
        for other in self.lanes:
            other.record(clock_s if other is lane else 0.0, factor)
        if self._on_batch is not None:
            self._on_batch(ran)

    async def _run(
        self, batch: list[_Pending[T, R]], lane: LaneQueue[_Pending[T, R]], slot: str, guarded: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        started, clock_started = loop.time(), self._now()
        # the last look before inference: callers may have gone or expired since the batch formed
        batch = [p for p in batch if not p.future.done() and not _expired(p, started)]
        try:
            if not batch:
                return
            results = await self._stages.run_batch([p.item for p in batch], lane.index)
            if len(results) != len(batch):
                raise RuntimeError(f"the model returned {len(results)} results for a batch of {len(batch)}")
        except Exception as exc:
            failure = self._failed(len(batch), exc)
            for p in batch:
                _set_exception(p.future, failure)
        else:
            run = _Run(started, loop.time() - started, len(batch))
            waits = tuple(started - p.enqueued for p in batch)
            session_s = self._now() - clock_started if slot == REGULAR else 0.0
            self._record(lane, session_s, Ran(lane.name, run.size, run.took, waits, guarded))
            for p, value in zip(batch, results):
                _set_result(p.future, (value, run))
        finally:
            self._release(slot, lane.index)

    def _failed(self, size: int, exc: Exception) -> InferenceFailed:
        log.error("event=batch_failed model=%s batch_size=%d reason=%r", self.name, size, str(exc), exc_info=exc)
        return InferenceFailed(f"inference failed for this batch: {exc}")

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event=batch_task_crashed model=%s", self.name, exc_info=task.exception())
