"""What a serving process does in the background: keep the queue-depth gauges current, and give
the allocator's free memory back once the server has gone quiet after some work (`memory.py`)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Protocol

from mobiserve.server.memory import trim_when_idle
from mobiserve.server.metrics import Metrics
from mobiserve.server.serving import LANES

QUEUE_SAMPLE_S = 0.5  # how often a worker writes its queue depths for the supervisor's endpoint


class Queue(Protocol):
    """A served model's queue, as the gauges read it (ServedModel)."""

    @property
    def name(self) -> str: ...

    def queued(self, lane: str | None = None) -> int: ...


class Upkeep:
    def __init__(self, metrics: Metrics, models: Sequence[Queue], work_done: Callable[[], int]):
        self._metrics = metrics
        self._models = models
        self._work_done = work_done  # a count that grows with every request answered
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """On the event loop, once the models serve."""
        if self._metrics.multiprocess:  # the supervisor cannot call back into this process: write
            self._tasks.append(asyncio.create_task(self._sample_queues(), name="queue-depth"))
        else:  # read on each scrape
            for model in self._models:
                self._metrics.queue_depth.labels(model.name).set_function(model.queued)
                for lane in LANES:
                    depth = functools.partial(model.queued, lane)
                    self._metrics.lane_depth.labels(model.name, lane).set_function(depth)
        busy = lambda: any(model.queued() for model in self._models)
        self._tasks.append(asyncio.create_task(trim_when_idle(busy, self._work_done), name="trim"))

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def _sample_queues(self) -> None:
        while True:
            for model in self._models:
                self._metrics.queue_depth.labels(model.name).set(model.queued())
                for lane in LANES:
                    self._metrics.lane_depth.labels(model.name, lane).set(model.queued(lane))
            await asyncio.sleep(QUEUE_SAMPLE_S)
