"""The batcher's lanes, without a server: which work a free session takes, and when.

A fake model records every batch (its lane, its items) and
runs a lane's batches only while the test lets that lane through, so each test decides the order
in which things can happen and checks the scheduler's decisions, never timing. The share guard
reads a fake clock that each batch advances by one unit per item.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from mobiserve.server.batching import Batcher, Lane, Ran, Stages
from mobiserve.server.errors import Overloaded

INTERACTIVE, BULK = 0, 1


@dataclass
class Lanes:
    """A model whose batches of each lane wait until that lane is let through."""

    batches: list[tuple[str, list[int]]] = field(default_factory=list)  # (lane, items)
    open: dict[int, asyncio.Event] = field(
        default_factory=lambda: {INTERACTIVE: asyncio.Event(), BULK: asyncio.Event()}
    )
    started: asyncio.Condition = field(default_factory=asyncio.Condition)
    now: float = 0.0  # the fake clock: one unit per item run

    async def run(self, items: list[int], lane: int) -> list[int]:
        self.batches.append(("bulk" if lane == BULK else "interactive", list(items)))
        async with self.started:
            self.started.notify_all()
        await self.open[lane].wait()
        self.now += len(items)
        return [i * 10 for i in items]

    async def alone(self, item: int, deadline: float | None, lane: int) -> tuple[int, float]:
        (value,) = await self.run([item], lane)
        return value, 0.0

    async def wait_batches(self, count: int) -> None:
        async with self.started:
            await self.started.wait_for(lambda: len(self.batches) >= count)

    def let_through(self, *lanes: int) -> None:
        for lane in lanes:
            self.open[lane].set()

    def lanes_run(self) -> list[str]:
        return [lane for lane, _ in self.batches]


async def same(index: int, item: int, deadline: float | None, lane: int) -> int:
    return item


def lanes(bulk_queue: int = 0, bulk_batch: int = 0, share: float = 0.0) -> tuple[Lane, Lane]:
    return Lane("interactive"), Lane("bulk", bulk_queue, bulk_batch, share)


def batcher(model: Lanes, *, alone: bool = False, **knobs: Any) -> Batcher[int, int, int]:
    knobs.setdefault("lanes", lanes())
    b = Batcher(Stages(same, model.run, model.alone if alone else None), clock=lambda: model.now, **knobs)
    b.start()
    return b


def submit(b: Batcher[int, int, int], *items: int, lane: int, wait: bool = False) -> asyncio.Task[list[int]]:
    async def values() -> list[int]:
        return (await b.submit(items, None, lane, wait)).values

    return asyncio.ensure_future(values())


async def settle() -> None:
    """Let every ready callback run (no wall-clock sleeping)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_free_session_takes_interactive_work_before_bulk_work_that_came_first() -> None:
    model = Lanes()
    b = batcher(model, max_batch_size=8)
    running = submit(b, 1, lane=BULK)
    await model.wait_batches(1)  # the only session runs a bulk batch
    queued = [submit(b, 2, 3, lane=BULK), submit(b, 4, lane=BULK), submit(b, 9, lane=INTERACTIVE)]
    await settle()
    model.let_through(INTERACTIVE, BULK)
    assert await asyncio.gather(running, *queued) == [[10], [20, 30], [40], [90]]
    assert model.batches == [("bulk", [1]), ("interactive", [9]), ("bulk", [2, 3, 4])]
    await b.close()


async def test_bulk_batches_are_capped_and_interactive_ones_are_not() -> None:
    model = Lanes()
    b = batcher(model, max_batch_size=8, lanes=lanes(bulk_batch=2))
    model.let_through(INTERACTIVE, BULK)
    assert await submit(b, *range(5), lane=BULK) == [0, 10, 20, 30, 40]
    assert await submit(b, *range(5), lane=INTERACTIVE) == [0, 10, 20, 30, 40]
    assert [len(items) for _, items in model.batches] == [2, 2, 1, 5]
    await b.close()


async def test_interactive_work_runs_on_the_spare_session_beside_a_bulk_batch() -> None:
    model = Lanes()
    b = batcher(model, max_batch_size=8, spare=1)
    bulk = submit(b, 1, 2, lane=BULK)
    await model.wait_batches(1)  # the regular session runs bulk, held
    model.let_through(INTERACTIVE)
    assert await submit(b, 7, 8, lane=INTERACTIVE) == [70, 80]  # did not wait for the bulk batch
    assert not bulk.done()
    model.let_through(BULK)
    assert await bulk == [10, 20]
    assert model.batches == [("bulk", [1, 2]), ("interactive", [7, 8])]
    await b.close()


async def test_a_lone_interactive_image_takes_the_spare_session_in_one_trip() -> None:
    model = Lanes()
    b = batcher(model, alone=True, max_batch_size=8, spare=1)
    bulk = submit(b, 1, 2, lane=BULK)
    await model.wait_batches(1)
    model.let_through(INTERACTIVE)
    assert await submit(b, 5, lane=INTERACTIVE) == [50]
    assert model.batches[-1] == ("interactive", [5])
    model.let_through(BULK)
    await bulk
    await b.close()


async def test_the_spare_session_never_takes_bulk_work() -> None:
    model = Lanes()
    b = batcher(model, max_batch_size=8, spare=1)
    first = submit(b, 1, lane=INTERACTIVE)
    await model.wait_batches(1)  # the regular session runs an interactive batch, held
    bulk = submit(b, 2, lane=BULK)
    await settle()
    assert len(model.batches) == 1 and not bulk.done()  # the spare session is free, but not for bulk
    model.let_through(INTERACTIVE, BULK)
    assert (await first, await bulk) == ([10], [20])
    assert model.batches == [("interactive", [1]), ("bulk", [2])]
    await b.close()


async def test_interactive_work_has_the_model_to_itself_only_while_no_bulk_work_is_queued_or_running() -> None:
    """What decides whether interactive work may take all the cores (ServedModel._widen)."""
    model = Lanes()
    b = batcher(model, max_batch_size=8)
    assert b.urgent_alone  # idle
    first = submit(b, 1, lane=INTERACTIVE)
    await model.wait_batches(1)  # the only session runs an interactive batch, held
    assert b.urgent_alone  # interactive work alone leaves it so
    bulk = submit(b, 2, lane=BULK)
    await settle()
    assert len(model.batches) == 1 and not b.urgent_alone  # bulk work queued
    model.let_through(INTERACTIVE)
    await model.wait_batches(2)  # the session runs the bulk batch, held
    assert not b.urgent_alone  # bulk work running
    model.let_through(BULK)
    assert (await first, await bulk) == ([10], [20])
    await settle()
    assert b.urgent_alone  # bulk work done: the cores are interactive work's again
    await b.close()


async def test_interactive_work_waits_for_interactive_batches_as_for_any_session() -> None:
    model = Lanes()
    b = batcher(model, max_batch_size=8, spare=1)
    first = submit(b, 1, lane=INTERACTIVE)
    await model.wait_batches(1)  # the regular session runs an interactive batch, held
    second = submit(b, 2, 3, lane=INTERACTIVE)
    await settle()
    assert len(model.batches) == 1 and not second.done()  # the spare is only for work held up by bulk batches
    model.let_through(INTERACTIVE)
    assert (await first, await second) == ([10], [20, 30])
    assert model.batches == [("interactive", [1]), ("interactive", [2, 3])]
    await b.close()


async def test_without_a_share_an_interactive_flood_runs_before_all_bulk_work() -> None:
    model = Lanes()
    b = batcher(model, max_batch_size=1)
    first = submit(b, 0, lane=INTERACTIVE)
    await model.wait_batches(1)
    tasks = [submit(b, i, lane=BULK) for i in (1, 2)] + [submit(b, i, lane=INTERACTIVE) for i in (3, 4, 5)]
    await settle()
    model.let_through(INTERACTIVE, BULK)
    await asyncio.gather(first, *tasks)
    assert model.lanes_run() == ["interactive"] * 4 + ["bulk"] * 2
    await b.close()


async def test_bulk_keeps_its_share_of_session_time_under_an_interactive_flood() -> None:
    model = Lanes()
    ran: list[Ran] = []
    b = batcher(model, max_batch_size=1, lanes=lanes(share=0.5), on_batch=ran.append)
    first = submit(b, 0, lane=INTERACTIVE)
    await model.wait_batches(1)
    tasks = [submit(b, i, lane=BULK) for i in (1, 2, 3)] + [submit(b, i, lane=INTERACTIVE) for i in range(4, 10)]
    await settle()
    model.let_through(INTERACTIVE, BULK)
    await asyncio.gather(first, *tasks)
    # every batch costs the same: bulk, owed half the time, gets every other session while it has work
    assert model.lanes_run()[:7] == ["interactive", "bulk"] * 3 + ["interactive"]
    assert [r.guarded for r in ran if r.lane == "bulk"] == [True, True, True]  # each one ahead of interactive work
    assert not any(r.guarded for r in ran if r.lane == "interactive")
    await b.close()


async def test_a_full_bulk_lane_queues_callers_that_wait_and_refuses_the_others() -> None:
    model = Lanes()
    b = batcher(model, max_batch_size=8, lanes=lanes(bulk_queue=2))
    running = submit(b, 0, lane=BULK)
    await model.wait_batches(1)  # the session is held: nothing leaves the queue
    fills = submit(b, 1, 2, lane=BULK, wait=True)
    await settle()
    waits = submit(b, 3, lane=BULK, wait=True)
    room = asyncio.ensure_future(b.room(BULK))
    await settle()
    assert b.lanes[BULK].admitted == 2 and not waits.done() and not room.done()
    with pytest.raises(Overloaded, match="2 bulk images queued, limit 2"):
        await b.submit([4], None, BULK)  # a caller that may not wait is refused at once
    interactive = submit(b, 5, lane=INTERACTIVE)  # the interactive lane has room of its own
    await settle()
    assert len(b.lanes[INTERACTIVE].items) == 1
    model.let_through(BULK, INTERACTIVE)
    assert (await running, await fills, await waits, await interactive) == ([0], [10, 20], [30], [50])
    await room
    assert b.lanes[BULK].admitted == 0
    await b.close()


async def test_a_request_larger_than_its_lane_waits_for_the_lane_to_empty_and_runs() -> None:
    model = Lanes()
    b = batcher(model, max_batch_size=8, lanes=lanes(bulk_queue=2, bulk_batch=2))
    model.let_through(BULK)
    assert await submit(b, *range(5), lane=BULK, wait=True) == [0, 10, 20, 30, 40]
    await b.close()


async def test_a_caller_that_gives_up_waiting_for_room_holds_none() -> None:
    model = Lanes()
    b = batcher(model, max_batch_size=8, lanes=lanes(bulk_queue=1))
    running = submit(b, 0, lane=BULK)
    await model.wait_batches(1)
    fills = submit(b, 1, lane=BULK, wait=True)
    gives_up = submit(b, 2, lane=BULK, wait=True)
    after = submit(b, 3, lane=BULK, wait=True)
    await settle()
    gives_up.cancel()
    await settle()
    assert b.lanes[BULK].admitted == 1
    model.let_through(BULK)
    assert (await running, await fills, await after) == ([0], [10], [30])
    assert gives_up.cancelled() and b.lanes[BULK].admitted == 0
    assert [items for _, items in model.batches] == [[0], [1], [3]]
    await b.close()
