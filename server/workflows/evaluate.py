"""The card's validation step, in-process: accuracy and speed of models on labelled images.

Everything a request goes through in the server is reused: `preprocess_encoded` (bit-exact with
the card), and `Model.infer` (batch assembly, softmax, the tie-exact ranking). Images are decoded
in a thread pool a little ahead of inference and never all held at once, so a 50,000-image
validation folder needs no more memory than the sample.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from mobiserve.server.errors import InvalidInput
from mobiserve.server.processing.preprocess import ImageLimits, preprocess_encoded
from mobiserve.server.runtime.model import Model
from mobiserve.server.workflows.dataset import LabelledImage

K = TypeVar("K")
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Accuracy:
    top1: float
    top5: float
    count: int


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class _Tally:
    """Counts over the labelled images (label >= 0); the top-1 class of every image."""

    top1: int = 0
    top5: int = 0
    count: int = 0
    predicted: list[np.ndarray] = field(default_factory=list)

    def add(self, order: np.ndarray, labels: np.ndarray) -> None:
        known = labels >= 0
        self.top1 += int((order[known, 0] == labels[known]).sum())
        self.top5 += int((order[known, :5] == labels[known, None]).any(axis=1).sum())
        self.count += int(known.sum())
        self.predicted.append(order[:, 0])

    def accuracy(self) -> Accuracy:
        n = max(self.count, 1)
        return Accuracy(self.top1 / n, self.top5 / n, self.count)


@dataclass
class Scored:
    """Accuracy of each model on the same images, the crops kept for timing, what was unreadable."""

    accuracy: list[Accuracy]
    samples: list[np.ndarray]
    skipped: list[Skipped] = field(default_factory=list)
    top1: list[np.ndarray] = field(default_factory=list)  # per model: the top-1 class of each image read

    def agreement(self, a: int = 0, b: int = 1) -> float:
        """Share of the images read on which models `a` and `b` give the same top-1 class."""
        same = self.top1[a] == self.top1[b]
        return float(same.mean()) if len(same) else 0.0


def ordered_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """`pool.map` that keeps at most `ahead` results pending, so memory stays bounded."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def load_crop(path: Path, limits: ImageLimits, decode: str = "exact") -> np.ndarray | Skipped:
    """The server's preprocessing of one file; an unreadable file is reported, not fatal."""
    try:
        return preprocess_encoded(path.read_bytes(), limits, decode)
    except (InvalidInput, OSError) as exc:
        return Skipped(path, str(exc))


def read_crops(
    paths: Sequence[Path], threads: int, limits: ImageLimits, ahead: int, desc: str, decode: str = "exact"
) -> Iterator[tuple[int, np.ndarray | Skipped]]:
    """(index, uint8 crop or Skipped) per path, in order, decoded `threads` at a time."""
    with ThreadPoolExecutor(threads, thread_name_prefix="preprocess") as pool:
        loaded = ordered_map(pool, lambda p: load_crop(p, limits, decode), paths, ahead)
        yield from enumerate(tqdm(loaded, total=len(paths), desc=desc, unit="img", leave=False, disable=None))


def score(
    models: Sequence[Model],
    images: Sequence[LabelledImage],
    batch_size: int,
    threads: int,
    keep: int = 0,
    limits: ImageLimits = ImageLimits(),
    decode: str = "exact",
) -> Scored:
    """Top-1/top-5 of every model on the same images (each image decoded once); keeps the first
    `keep` crops for timing. Images with label -1 count for agreement only."""
    tallies = [_Tally() for _ in models]
    result = Scored([], [])
    batch: list[np.ndarray] = []
    batch_labels: list[int] = []

    def flush() -> None:
        labels = np.asarray(batch_labels)
        for model, tally in zip(models, tallies):
            tally.add(model.infer(batch).order, labels)
        batch.clear()
        batch_labels.clear()

    paths = [image.path for image in images]
    ahead = 2 * batch_size + threads
    for i, crop in read_crops(paths, threads, limits, ahead, "evaluating", decode):
        if isinstance(crop, Skipped):
            result.skipped.append(crop)
            continue
        if len(result.samples) < keep:
            result.samples.append(crop)
        batch.append(crop)
        batch_labels.append(images[i].label)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    result.accuracy = [t.accuracy() for t in tallies]
    result.top1 = [np.concatenate(t.predicted) if t.predicted else np.zeros(0, np.int64) for t in tallies]
    return result


def interleaved_medians(cases: Mapping[K, Callable[[], object]], rounds: int) -> dict[K, float]:
    """Median seconds of each case, run side by side: one untimed warm-up each, then `rounds`
    rounds that run every case once (order reversed every other round), so drift in the
    machine's load falls on all cases alike instead of on whichever ran last."""
    keys = list(cases)
    for key in keys:
        cases[key]()
    times: dict[K, list[float]] = {key: [] for key in keys}
    for r in range(max(rounds, 1)):
        for key in keys if r % 2 == 0 else reversed(keys):
            started = time.perf_counter()
            cases[key]()
            times[key].append(time.perf_counter() - started)
    return {key: statistics.median(t) for key, t in times.items()}


def batch_of(samples: Sequence[np.ndarray], size: int) -> list[np.ndarray]:
    """`size` crops, reusing the samples when there are fewer images than that."""
    if not samples:
        raise ValueError("no images to time")
    return [samples[i % len(samples)] for i in range(size)]


@dataclass(frozen=True)
class Speed:
    latency_ms: float  # batch 1, median, through Model.infer (assembly + run + softmax + ranking)
    throughput: dict[int, float]  # images per second by batch size
    rounds: int

    @property
    def best_batch_size(self) -> int:
        return max(self.throughput, key=lambda size: self.throughput[size])


def speed(model: Model, samples: Sequence[np.ndarray], batch_sizes: Sequence[int], rounds: int) -> Speed:
    """Latency at batch 1 and throughput at each batch size, measured side by side."""
    sizes = sorted({1, *batch_sizes})
    batches = {size: batch_of(samples, size) for size in sizes}
    medians = interleaved_medians({size: functools.partial(model.infer, batches[size]) for size in sizes}, rounds)
    return Speed(medians[1] * 1000, {size: size / medians[size] for size in sizes}, rounds)
