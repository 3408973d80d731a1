"""The batcher alone: a fake model waits on an asyncio.Event, so each test decides when a batch runs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mobiserve.server.batching import Batcher, Lane, Stages
from mobiserve.server.errors import DeadlineExceeded, InferenceFailed, InvalidInput, Overloaded

from helpers import poll_until


class FakeModel:
    """Records each batch; a batch finishes only when the test sets `release`."""

    def __init__(self, fail_on: int | None = None):
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.fail_on = fail_on

    async def __call__(self, items: list[int], lane: int = 0, spare: bool = False) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        if self.fail_on in items:
            raise RuntimeError("boom")
        return [i * 10 for i in items]


async def same(index: int, item: int, deadline: float | None, lane: int) -> int:
    return item


def batcher(model: FakeModel, alone: FakeModel | None = None, **knobs: Any) -> Batcher[int, int, int]:
    """A started batcher over the fake model; `alone` also gives it an idle fast path."""

    async def run_alone(item: int, deadline: float | None, lane: int, spare: bool) -> tuple[int, float]:
        assert alone is not None
        (value,) = await alone([item])
        return value, 0.0

    if "max_queue_size" in knobs:
        knobs["lanes"] = (Lane("default", knobs.pop("max_queue_size")),)
    b = Batcher(Stages(same, model, run_alone if alone else None), **knobs)
    b.start()
    return b


async def submit(b: Batcher[int, int, int], *items: int, deadline: float | None = None) -> list[int]:
    return (await b.submit(items, deadline)).values


@pytest.fixture
def model() -> FakeModel:
    return FakeModel()


async def test_lone_request_runs_at_once_and_results_keep_order(model: FakeModel) -> None:
    b = batcher(model, max_batch_size=8)
    model.release.set()
    assert await submit(b, 3, 1, 2) == [30, 10, 20]
    assert model.batches == [[3, 1, 2]]
    await b.close()


async def test_queued_requests_form_one_batch_when_the_session_frees(model: FakeModel) -> None:
    b = batcher(model, max_batch_size=8)
    first = asyncio.create_task(submit(b, 0))
    await model.started.wait()  # the only session is busy with [0]
    rest = [asyncio.create_task(submit(b, i, i + 100)) for i in range(1, 4)]
    await poll_until(lambda: b.waiting == 6, timeout_s=10)
    model.release.set()
    assert await first == [0]
    assert await asyncio.gather(*rest) == [[10, 1010], [20, 1020], [30, 1030]]
    assert model.batches == [[0], [1, 101, 2, 102, 3, 103]]  # across requests and their images
    await b.close()


async def test_max_batch_size_splits_a_large_request(model: FakeModel) -> None:
    b = batcher(model, max_batch_size=4)
    model.release.set()
    assert await submit(b, *range(10)) == [i * 10 for i in range(10)]
    assert [len(x) for x in model.batches] == [4, 4, 2]
    await b.close()


async def test_queue_delay_lets_a_batch_fill(model: FakeModel) -> None:
    b = batcher(model, max_batch_size=3, max_queue_delay_s=60)  # the window never expires here
    model.release.set()
    tasks = [asyncio.create_task(submit(b, i)) for i in range(3)]
    await asyncio.gather(*tasks)  # the third arrival fills the batch and ends the wait
    assert model.batches == [[0, 1, 2]]
    await b.close()


async def test_cancelled_caller_leaves_the_queue_before_inference(model: FakeModel) -> None:
    b = batcher(model, max_batch_size=8)
    first = asyncio.create_task(submit(b, 0))
    await model.started.wait()
    gone = asyncio.create_task(submit(b, 1))
    kept = asyncio.create_task(submit(b, 2))
    await poll_until(lambda: b.waiting == 2, timeout_s=10)
    gone.cancel()
    await poll_until(lambda: b.admitted == 1, timeout_s=10)  # capacity returned before any batch ran
    model.release.set()
    assert await kept == [20]
    await first
    assert model.batches == [[0], [2]]
    await b.close()


async def test_expired_deadline_is_dropped_before_inference(model: FakeModel) -> None:
    b = batcher(model, max_batch_size=8)
    first = asyncio.create_task(submit(b, 0))
    await model.started.wait()
    loop = asyncio.get_running_loop()
    expired = asyncio.create_task(submit(b, 1, deadline=loop.time()))
    await poll_until(lambda: b.waiting == 1, timeout_s=10)
    model.release.set()
    with pytest.raises(DeadlineExceeded):
        await expired
    await first
    assert model.batches == [[0]]
    await b.close()


async def test_full_queue_refuses_at_once_and_recovers(model: FakeModel) -> None:
    b = batcher(model, max_batch_size=1, max_queue_size=3)
    held = [asyncio.create_task(submit(b, 0))]
    await model.started.wait()  # 0 runs; 1, 2, 3 fill the queue
    held += [asyncio.create_task(submit(b, i)) for i in range(1, 4)]
    await poll_until(lambda: b.admitted == 3, timeout_s=10)
    with pytest.raises(Overloaded, match="overloaded"):
        await submit(b, 4)
    with pytest.raises(InvalidInput, match="more than the default queue limit of 3"):
        await submit(b, 5, 6, 7, 8)
    model.release.set()
    await asyncio.gather(*held)
    assert await submit(b, 7) == [70]
    await b.close()


async def test_a_failing_batch_fails_only_its_own_requests() -> None:
    model = FakeModel(fail_on=13)
    b = batcher(model, max_batch_size=1)
    model.release.set()
    with pytest.raises(InferenceFailed, match="boom"):
        await submit(b, 13)
    assert await submit(b, 2) == [20]
    await b.close()


async def test_close_runs_everything_already_queued(model: FakeModel) -> None:
    b = batcher(model, max_batch_size=2)
    tasks = [asyncio.create_task(submit(b, i)) for i in range(5)]
    await model.started.wait()
    await poll_until(lambda: b.waiting == 3, timeout_s=10)  # [0, 1] runs, 2, 3 and 4 are queued
    closing = asyncio.create_task(b.close())
    model.release.set()
    await closing
    assert [await t for t in tasks] == [[i * 10] for i in range(5)]


async def test_an_idle_model_runs_a_lone_input_alone_and_queued_work_waits_for_it(model: FakeModel) -> None:
    alone = FakeModel()
    b = batcher(model, alone, max_batch_size=8)
    lone = asyncio.create_task(submit(b, 4))
    await alone.started.wait()  # idle: the lone input took the fast path and holds the only slot
    waiting = asyncio.create_task(submit(b, 5))
    await poll_until(lambda: b.waiting == 1, timeout_s=10)
    assert model.batches == []  # queued behind it, not run beside it
    alone.release.set()
    model.release.set()
    assert (await lone, await waiting) == ([40], [50])
    assert (alone.batches, model.batches) == ([[4]], [[5]])
    await b.close()


async def test_no_fast_path_for_several_inputs_or_without_a_free_slot(model: FakeModel) -> None:
    alone = FakeModel()
    b = batcher(model, alone, max_batch_size=8, concurrency=2)
    first = asyncio.create_task(submit(b, 0, 1))  # two inputs: always batched
    await model.started.wait()
    lone = asyncio.create_task(submit(b, 2))  # one slot busy, one free, nothing queued: alone
    await alone.started.wait()
    queued = asyncio.create_task(submit(b, 3))  # no slot free: it queues
    await poll_until(lambda: b.waiting == 1, timeout_s=10)
    assert (model.batches, alone.batches) == ([[0, 1]], [[2]])
    alone.release.set()
    model.release.set()
    assert (await first, await lone, await queued) == ([0, 10], [20], [30])
    assert model.batches == [[0, 1], [3]]
    await b.close()
