"""The domain layer: a served model is preprocessing -> batcher -> onnxruntime -> top-k.

The transport hands in plain Python inputs and gets plain dataclasses back; nothing here knows
about gRPC. Per image, validation and preprocessing happen *before* the image joins a batch, so
a corrupt image fails alone and never takes its batch-mates down with it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mobiserve.server.batching import Batched, Batcher
from mobiserve.server.config import ModelConfig
from mobiserve.server.errors import DeadlineExceeded, InvalidInput, ModelNotFound, shown
from mobiserve.server.processing.labels import Labels
from mobiserve.server.processing.preprocess import ImageLimits, preprocess_encoded, preprocess_tensor
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
class Timing:
    queue_us: int
    preprocess_us: int
    inference_us: int
    batch_size: int


@dataclass(frozen=True)
class Classified:
    model: str
    results: list[list[ClassScore]]  # results[i] answers images[i]
    timing: Timing


_Scores = tuple[np.ndarray, np.ndarray]  # one image's (probabilities, order)


class Servable(Protocol):
    """What the transport needs of a served model (ServedModel; the bench's unbatched server)."""

    config: ModelConfig
    model: Model

    @property
    def name(self) -> str: ...

    async def classify(
        self, images: Sequence[ImageInput], top_k: int = 0, deadline: float | None = None
    ) -> Classified: ...


def checked_top_k(images: Sequence[ImageInput], top_k: int, model: Model, max_images: int) -> int:
    """Validate a request's shape before any work; returns top_k with 0 meaning the default."""
    top_k = top_k or DEFAULT_TOP_K
    if not images:
        raise InvalidInput("request has no images")
    if len(images) > max_images:
        raise InvalidInput(f"request has {len(images)} images; the limit is {max_images}")
    if top_k > model.num_classes:
        raise InvalidInput(f"top_k is {top_k}; the model has {model.num_classes} classes")
    return top_k


def prepare(index: int, image: ImageInput, limits: ImageLimits, deadline: float | None = None) -> np.ndarray:
    """Worker thread: one image -> model input; drops expired work before spending CPU on it
    and names the image in any error."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("deadline passed before preprocessing; not run")
    try:
        if isinstance(image, RawTensor):
            return preprocess_tensor(image.shape, image.dtype, image.data, limits)
        return preprocess_encoded(image, limits)
    except InvalidInput as exc:
        raise InvalidInput(f"image {index}: {exc}") from None


def run_whole(
    model: Model, images: Sequence[ImageInput], limits: ImageLimits, deadline: float | None = None
) -> tuple[list[_Scores], Timing]:
    """Worker thread: preprocess and infer one request in a single trip, with no batcher."""
    started = time.perf_counter()
    items = [prepare(i, image, limits, deadline) for i, image in enumerate(images)]
    prepared = time.perf_counter()
    scores = model.infer(items)
    took = time.perf_counter() - prepared
    timing = Timing(0, int((prepared - started) * 1e6), int(took * 1e6), len(items))
    return list(zip(scores.probabilities, scores.order)), timing


def top_classes(labels: Labels, scores: _Scores, top_k: int) -> list[ClassScore]:
    probabilities, order = scores
    return [ClassScore(int(i), labels.wnids[i], labels.names[i], float(probabilities[i])) for i in order[:top_k]]


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
        self.config = config
        self.model = model
        self.limits = limits
        self.max_images_per_request = max_images_per_request
        self._on_batch = on_batch
        self._preprocess_pool = preprocess_pool
        # one thread per session instance: the batcher never runs more batches than that
        self._infer_pool = ThreadPoolExecutor(config.instances, thread_name_prefix=f"infer-{config.name}")
        self.batcher: Batcher[np.ndarray, _Scores] = Batcher(
            self._run_batch,
            max_batch_size=config.max_batch_size,
            max_queue_delay_s=config.max_queue_delay_ms / 1000,
            concurrency=config.instances,
            max_queue_size=config.max_queue_size,
            name=config.name,
            on_batch=on_batch,
        )

    @property
    def name(self) -> str:
        return self.config.name

    def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()
        self._infer_pool.shutdown(wait=True)

    async def classify(self, images: Sequence[ImageInput], top_k: int = 0, deadline: float | None = None) -> Classified:
        """Classify images; `deadline` is on the event loop's clock (time.monotonic)."""
        top_k = checked_top_k(images, top_k, self.model, self.max_images_per_request)
        loop = asyncio.get_running_loop()
        if len(images) == 1 and await self.batcher.claim_if_idle():
            # An idle model: preprocess and infer in one worker-thread trip, skipping two
            # handoffs. It holds the batcher's session slot (not queue room: it never waits),
            # so work arriving meanwhile queues behind it as behind any running batch.
            try:
                scores, timing = await loop.run_in_executor(self._preprocess_pool, self._run_alone, images[0], deadline)
            finally:
                self.batcher.release()
            return Classified(self.name, [top_classes(self.model.labels, scores, top_k)], timing)
        with self.batcher.admit(len(images)) as admission:
            started = time.perf_counter()
            items = await asyncio.gather(
                *(
                    loop.run_in_executor(self._preprocess_pool, prepare, i, image, self.limits, deadline)
                    for i, image in enumerate(images)
                )
            )
            preprocess_s = time.perf_counter() - started
            batched = await self.batcher.submit(admission, items, deadline)
        return Classified(
            self.name, [top_classes(self.model.labels, b.value, top_k) for b in batched], _timing(preprocess_s, batched)
        )

    def _run_alone(self, image: ImageInput, deadline: float | None) -> tuple[_Scores, Timing]:
        (scores,), timing = run_whole(self.model, [image], self.limits, deadline)
        if self._on_batch is not None:
            self._on_batch(1, timing.inference_us / 1e6)
        return scores, timing

    async def _run_batch(self, items: list[np.ndarray]) -> list[_Scores]:
        scores = await asyncio.get_running_loop().run_in_executor(self._infer_pool, self.model.infer, items)
        return list(zip(scores.probabilities, scores.order))


def _timing(preprocess_s: float, batched: list[Batched[_Scores]]) -> Timing:
    # images of one request may ride in several batches: count each batch's run once
    runs = {(b.batch_size, b.inference_s) for b in batched}
    return Timing(
        queue_us=int(max(b.queue_s for b in batched) * 1e6),
        preprocess_us=int(preprocess_s * 1e6),
        inference_us=int(sum(s for _, s in runs) * 1e6),
        batch_size=max(b.batch_size for b in batched),
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
