"""The domain layer: a served model is preprocessing -> batcher -> onnxruntime -> scores.

The transport hands in plain Python inputs and gets plain dataclasses back; nothing here knows
about gRPC, and the transport knows a model only by its `ModelDescription`. Per image,
validation and preprocessing happen *before* the image joins a batch, so a corrupt image fails
alone and never takes its batch-mates down with it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mobiserve.common.labels import Labels
from mobiserve.server import threads
from mobiserve.server.batching import Answered, Batcher, Lane, Ran, Stages
from mobiserve.server.config import ModelConfig
from mobiserve.server.errors import DeadlineExceeded, InvalidInput, ModelNotFound, shown
from mobiserve.server.processing.preprocess import (
    INPUT_SIZE,
    ImageLimits,
    preprocess_encoded,
    preprocess_tensor,
    preprocessing,
)
from mobiserve.server.runtime.model import Model

DEFAULT_TOP_K = 5
INTERACTIVE, BULK = "interactive", "bulk"  # the lanes of every model, most urgent first
LANES = (INTERACTIVE, BULK)
LEAST_URGENT = -1  # a priority level: a model's last one, whatever its number of levels


@dataclass(frozen=True)
class RawTensor:
    shape: tuple[int, ...]
    dtype: str
    data: bytes


ImageInput = bytes | RawTensor


@dataclass(frozen=True)
class ClassScore:
    index: int
    wnid: str
    name: str
    score: float


@dataclass(frozen=True)
class ImageScores:
    """One image's answer: the model's raw output, its softmax, and the classes most probable first."""

    logits: np.ndarray  # [C] float32
    probabilities: np.ndarray  # [C] float32
    order: np.ndarray  # [C] int64


@dataclass(frozen=True)
class Timing:
    queue_us: int
    preprocess_us: int
    inference_us: int
    batch_size: int
    lane: str = INTERACTIVE  # the lane that served it


@dataclass(frozen=True)
class ModelDescription:
    """What the transport may know of a served model: enough to describe it and check requests."""

    name: str
    version: str
    input_name: str
    input_shape: tuple[int, ...]  # batch dimension first, -1
    input_dtype: str
    output_name: str
    num_classes: int
    labels: Labels
    preprocessing: str
    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    instances: int
    intra_op_threads: int
    path: str
    sha256: str  # of the model file: which model this is, without revealing where it lives
    priority_levels: int = 2
    interactive_levels: int = 1
    default_priority_level: int = 0
    bulk_max_queue_size: int = 0
    bulk_max_batch_size: int = 0
    bulk_min_share: float = 0.0


@dataclass(frozen=True)
class Classified:
    model: str
    scores: list[ImageScores]  # scores[i] answers images[i]
    timing: Timing
    labels: Labels

    def top(self, k: int) -> list[list[ClassScore]]:
        """The `k` most probable classes of each image."""
        wnids, names = self.labels.wnids, self.labels.names
        return [
            [ClassScore(int(i), wnids[i], names[i], float(s.probabilities[i])) for i in s.order[:k]]
            for s in self.scores
        ]


class Servable(Protocol):
    """What the transport needs of a served model (ServedModel; the bench's unbatched server)."""

    description: ModelDescription

    @property
    def name(self) -> str: ...

    async def classify(
        self, images: Sequence[ImageInput], deadline: float | None = None, lane: str = INTERACTIVE, wait: bool = False
    ) -> Classified: ...

    def has_room(self, lane: str) -> bool: ...

    async def room(self, lane: str) -> None: ...


def describe(config: ModelConfig, model: Model) -> ModelDescription:
    return ModelDescription(
        name=config.name,
        version=config.version,
        input_name=model.input_name,
        input_shape=(-1, 3, INPUT_SIZE, INPUT_SIZE),
        input_dtype="float32",
        output_name=model.output_name,
        num_classes=model.num_classes,
        labels=model.labels,
        preprocessing=preprocessing(config.decode),
        max_batch_size=config.max_batch_size,
        max_queue_delay_ms=config.max_queue_delay_ms,
        max_queue_size=config.max_queue_size,
        instances=config.instances,
        intra_op_threads=config.intra_op_threads,
        path=config.path,
        sha256=model.sha256,
        priority_levels=config.priority_levels,
        interactive_levels=config.interactive_levels,
        default_priority_level=config.default_priority_level,
        bulk_max_queue_size=config.bulk_max_queue_size,
        bulk_max_batch_size=config.bulk_max_batch_size,
        bulk_min_share=config.bulk_min_share,
    )


def lane_of(d: ModelDescription, level: int, streaming: bool) -> str:
    """The lane of a request asking for priority `level` (1 is the most urgent, LEAST_URGENT the
    model's last level; 0: the default, the model's `default_priority_level` or, without one, by
    RPC: unary calls are interactive, stream messages bulk). Refuses a level the model does not have."""
    if level == LEAST_URGENT:
        level = d.priority_levels
    if not 0 <= level <= d.priority_levels:
        raise InvalidInput(
            f"priority level is {level}; model {d.name!r} has levels 1 to {d.priority_levels} (0: its default)"
        )
    if level == 0:
        level = d.default_priority_level or (d.priority_levels if streaming else 1)
    return INTERACTIVE if level <= d.interactive_levels else BULK


def lanes_of(config: ModelConfig) -> tuple[Lane, ...]:
    return (
        Lane(INTERACTIVE, config.max_queue_size),
        Lane(BULK, config.bulk_max_queue_size, config.bulk_max_batch_size, config.bulk_min_share),
    )


def checked_top_k(top_k: int, num_classes: int) -> int:
    """top_k with 0 meaning the default; refused when the model has fewer classes."""
    top_k = top_k or DEFAULT_TOP_K
    if top_k < 0 or top_k > num_classes:
        raise InvalidInput(f"top_k is {top_k}; the model has {num_classes} classes")
    return top_k


def check_count(images: Sequence[ImageInput], max_images: int) -> None:
    """Validate a request's size before any work."""
    if not images:
        raise InvalidInput("request has no images")
    if len(images) > max_images:
        raise InvalidInput(f"request has {len(images)} images; the limit is {max_images}")


def prepare(
    index: int, image: ImageInput, limits: ImageLimits, deadline: float | None = None, decode: str = "exact"
) -> np.ndarray:
    """Worker thread: one image -> model input; drops expired work before spending CPU on it
    and names the image in any error."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("deadline passed before preprocessing; not run")
    try:
        if isinstance(image, RawTensor):
            return preprocess_tensor(image.shape, image.dtype, image.data, limits)
        return preprocess_encoded(image, limits, decode)
    except InvalidInput as exc:
        raise InvalidInput(f"image {index}: {exc}") from None


def scores_of(model: Model, items: list[np.ndarray], widen: bool = True) -> list[ImageScores]:
    """Worker thread: one onnxruntime run over prepared items (`widen`: Model.infer)."""
    batch = model.infer(items, widen)
    return [ImageScores(*row) for row in zip(batch.logits, batch.probabilities, batch.order)]


def run_whole(
    model: Model,
    images: Sequence[ImageInput],
    limits: ImageLimits,
    deadline: float | None = None,
    widen: bool = True,
    decode: str = "exact",
) -> tuple[list[ImageScores], float]:
    """Worker thread: preprocess and infer one request in a single trip, with no batcher.
    Returns the scores and the seconds spent preprocessing."""
    started = time.perf_counter()
    items = [prepare(i, image, limits, deadline, decode) for i, image in enumerate(images)]
    prepared = time.perf_counter() - started
    if deadline is not None and time.monotonic() >= deadline:  # expired while preprocessing
        raise DeadlineExceeded("deadline passed before inference; not run")
    return scores_of(model, items, widen), prepared


class ServedModel:
    """One model's serving pipeline. Create and use on the event loop.

    Each lane has its own threads: preprocessing (`preprocess_pools`, one executor per lane, shared
    by all models) and inference (here), so an interactive image never queues behind bulk images
    for a thread. Bulk threads run at an OS priority lowered by `nice`, so that the kernel runs
    interactive work first. The model has `spare` sessions more than the batcher's regular ones,
    which only interactive work takes, so that it runs beside bulk batches. Only interactive work
    takes the model's all-core path, and only while no bulk work is about (`_widen`): bulk work
    runs on the narrow sessions, where an image costs the least CPU, at its lower priority."""

    def __init__(
        self,
        config: ModelConfig,
        model: Model,
        preprocess_pools: Sequence[Executor],
        limits: ImageLimits,
        max_images_per_request: int,
        on_batch: Callable[[Ran], None] | None = None,
        spare: int = 1,
        nice: int = 0,
    ):
        self.description = describe(config, model)
        self.model = model
        self.limits = limits
        self.decode = config.decode
        self.max_images_per_request = max_images_per_request
        self._preprocess_pools = preprocess_pools
        # one thread per batch the batcher may run at once in that lane
        self._infer_pools = [
            ThreadPoolExecutor(
                config.instances + (spare if lane == INTERACTIVE else 0),
                thread_name_prefix=f"infer-{config.name}",
                initializer=threads.pool_initializer(0 if lane == INTERACTIVE else nice),
            )
            for lane in LANES
        ]
        self.batcher: Batcher[ImageInput, np.ndarray, ImageScores] = Batcher(
            Stages(self._prepare, self._run_batch, self._run_alone),
            max_batch_size=config.max_batch_size,
            max_queue_delay_s=config.max_queue_delay_ms / 1000,
            concurrency=config.instances,
            lanes=lanes_of(config),
            spare=spare,
            name=config.name,
            on_batch=on_batch,
        )

    @property
    def name(self) -> str:
        return self.description.name

    def start(self) -> None:
        self.batcher.start()

    def queued(self, lane: str | None = None) -> int:
        """Images admitted and not yet in a batch, in one lane or all: what the queue limits bound."""
        if lane is None:
            return self.batcher.admitted
        return self.batcher.lanes[LANES.index(lane)].admitted

    async def close(self) -> None:
        await self.batcher.close()
        for pool in self._infer_pools:
            pool.shutdown(wait=True)

    def has_room(self, lane: str) -> bool:
        """`lane` has room for another image, with no one waiting for room ahead."""
        return self.batcher.lanes[LANES.index(lane)].has_room()

    async def room(self, lane: str) -> None:
        """Until `lane` has room for another image: a stream waits here before reading on."""
        await self.batcher.room(LANES.index(lane))

    async def classify(
        self, images: Sequence[ImageInput], deadline: float | None = None, lane: str = INTERACTIVE, wait: bool = False
    ) -> Classified:
        """Classify images in `lane`; `deadline` is on the event loop's clock (time.monotonic).
        wait: when the lane is full, wait for room (a stream's message) instead of refusing."""
        check_count(images, self.max_images_per_request)
        answered = await self.batcher.submit(images, deadline, LANES.index(lane), wait)
        return Classified(self.name, answered.values, _timing(answered), self.model.labels)

    async def _prepare(self, index: int, image: ImageInput, deadline: float | None, lane: int) -> np.ndarray:
        loop = asyncio.get_running_loop()
        pool = self._preprocess_pools[lane]
        return await loop.run_in_executor(pool, prepare, index, image, self.limits, deadline, self.decode)

    async def _run_batch(self, items: list[np.ndarray], lane: int) -> list[ImageScores]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._infer_pools[lane], scores_of, self.model, items, self._widen(lane))

    async def _run_alone(self, image: ImageInput, deadline: float | None, lane: int) -> tuple[ImageScores, float]:
        loop = asyncio.get_running_loop()
        scores, prepared_s = await loop.run_in_executor(
            self._infer_pools[lane],
            run_whole,
            self.model,
            [image],
            self.limits,
            deadline,
            self._widen(lane),
            self.decode,
        )
        return scores[0], prepared_s

    def _widen(self, lane: int) -> bool:
        """May this lane's next run take the model's all-core path? Only interactive work, and only
        while no bulk work is queued or running: between bulk batches, the all-core session's
        spinning threads would take the cores the bulk work is using (one process beside 4 streams:
        bulk kept 0.46-0.52x of its throughput alone without this rule, 0.65x with it)."""
        return LANES[lane] == INTERACTIVE and self.batcher.urgent_alone


def _timing(answered: Answered[ImageScores]) -> Timing:
    return Timing(
        queue_us=int(answered.queue_s * 1e6),
        preprocess_us=int(answered.preprocess_s * 1e6),
        inference_us=int(answered.inference_s * 1e6),
        batch_size=answered.batch_size,
        lane=answered.lane,
    )


class ModelRegistry:
    """Served models by name, with a default for requests that name none."""

    def __init__(self, models: Sequence[Servable], default: str):
        self.models = {m.name: m for m in models}
        self.default = default

    def get(self, name: str) -> Servable:
        try:
            return self.models[name or self.default]
        except KeyError:
            raise ModelNotFound(
                f"model {shown(name)} not found; this server serves: {', '.join(self.models)}"
            ) from None

    def __iter__(self) -> Iterator[Servable]:
        return iter(self.models.values())
