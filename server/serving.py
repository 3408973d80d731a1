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
from mobiserve.server.batching import Answered, Batcher, Stages
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

    async def classify(self, images: Sequence[ImageInput], deadline: float | None = None) -> Classified: ...


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


def scores_of(model: Model, items: list[np.ndarray]) -> list[ImageScores]:
    """Worker thread: one onnxruntime run over prepared items."""
    batch = model.infer(items)
    return [ImageScores(*row) for row in zip(batch.logits, batch.probabilities, batch.order)]


def run_whole(
    model: Model,
    images: Sequence[ImageInput],
    limits: ImageLimits,
    deadline: float | None = None,
    decode: str = "exact",
) -> tuple[list[ImageScores], float]:
    """Worker thread: preprocess and infer one request in a single trip, with no batcher.
    Returns the scores and the seconds spent preprocessing."""
    started = time.perf_counter()
    items = [prepare(i, image, limits, deadline, decode) for i, image in enumerate(images)]
    prepared = time.perf_counter() - started
    if deadline is not None and time.monotonic() >= deadline:  # expired while preprocessing
        raise DeadlineExceeded("deadline passed before inference; not run")
    return scores_of(model, items), prepared


class ServedModel:
    """One model's serving pipeline. Create and use on the event loop."""

    def __init__(
        self,
        config: ModelConfig,
        model: Model,
        preprocess_pool: Executor,
        limits: ImageLimits,
        max_images_per_request: int,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        self.description = describe(config, model)
        self.model = model
        self.limits = limits
        self.decode = config.decode
        self.max_images_per_request = max_images_per_request
        self._preprocess_pool = preprocess_pool
        # one thread per session instance: the batcher never runs more batches than that
        self._infer_pool = ThreadPoolExecutor(
            config.instances, thread_name_prefix=f"infer-{config.name}", initializer=threads.name_current
        )
        self.batcher: Batcher[ImageInput, np.ndarray, ImageScores] = Batcher(
            Stages(self._prepare, self._run_batch, self._run_alone),
            max_batch_size=config.max_batch_size,
            max_queue_delay_s=config.max_queue_delay_ms / 1000,
            concurrency=config.instances,
            max_queue_size=config.max_queue_size,
            name=config.name,
            on_batch=on_batch,
        )

    @property
    def name(self) -> str:
        return self.description.name

    def start(self) -> None:
        self.batcher.start()

    def queued(self) -> int:
        """Images admitted and not yet in a batch: what `max_queue_size` bounds."""
        return self.batcher.admitted

    async def close(self) -> None:
        await self.batcher.close()
        self._infer_pool.shutdown(wait=True)

    async def classify(self, images: Sequence[ImageInput], deadline: float | None = None) -> Classified:
        """Classify images; `deadline` is on the event loop's clock (time.monotonic)."""
        check_count(images, self.max_images_per_request)
        answered = await self.batcher.submit(images, deadline)
        return Classified(self.name, answered.values, _timing(answered), self.model.labels)

    async def _prepare(self, index: int, image: ImageInput, deadline: float | None) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._preprocess_pool, prepare, index, image, self.limits, deadline, self.decode
        )

    async def _run_batch(self, items: list[np.ndarray]) -> list[ImageScores]:
        return await asyncio.get_running_loop().run_in_executor(self._infer_pool, scores_of, self.model, items)

    async def _run_alone(self, image: ImageInput, deadline: float | None) -> tuple[ImageScores, float]:
        loop = asyncio.get_running_loop()
        scores, prepared_s = await loop.run_in_executor(
            self._infer_pool, run_whole, self.model, [image], self.limits, deadline, self.decode
        )
        return scores[0], prepared_s


def _timing(answered: Answered[ImageScores]) -> Timing:
    return Timing(
        queue_us=int(answered.queue_s * 1e6),
        preprocess_us=int(answered.preprocess_s * 1e6),
        inference_us=int(answered.inference_s * 1e6),
        batch_size=answered.batch_size,
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
