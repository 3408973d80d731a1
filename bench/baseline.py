"""In-process references with no gRPC, measured in the same run as the server: what the machine allows.

- the card's plain Pillow pipeline (decode, resize the whole image, crop, normalise in numpy) in a
  thread pool feeding onnxruntime in batches of 16: `inprocess()` of the contract check
  (../shared/checks/check_perf.py) line for line, with one thread per core for both;
- mobiserve's own pipeline: `preprocess_encoded` in a pool of one thread per core (the server's
  default) feeding `Model.infer` in batches of the server's max batch size, the model loaded with
  the server's own code and tuning;
- single-image latency (median of preprocess + batch-1 run) of both;
- onnxruntime alone on ready float32 tensors, per batch size: the ceiling for the tensor path;
- ms per image of each preprocessing, side by side on the same images.
"""

from __future__ import annotations

import io
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from mobiserve.bench.cpu import Cost, Probe, per_image_ms
from mobiserve.server import threads as os_threads
from mobiserve.server.app import load_model
from mobiserve.server.config import ModelConfig
from mobiserve.server.processing.normalize import assemble
from mobiserve.server.processing.preprocess import ImageLimits, preprocess_encoded
from mobiserve.server.runtime.session import SessionTuning, open_session

CARD_BATCH = 16
LATENCY_IMAGES = 60
ORT_BATCHES = (1, 8, 16, 32, 64)

_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclass(frozen=True)
class Baseline:
    model: str
    seconds: float  # per throughput measurement
    threads: int  # preprocessing threads and the card's intra-op threads
    card_img_s: float
    own_img_s: float
    card_latency_ms: float  # single image, median: preprocess + batch-1 run
    own_latency_ms: float
    own_batch: int
    ort_img_s: dict[int, float]  # batch size -> images/s on ready float32 inputs, server tuning
    ort_best_img_s: float
    ort_best_batch: int
    # the harness's own CPU over each throughput run, ms per image, by thread role (cpu.ROLES)
    card_cpu: PipelineCost | None = None
    own_cpu: PipelineCost | None = None
    ort_cpu_ms: dict[int, float] = field(default_factory=dict)  # batch size -> ms CPU per image


@dataclass(frozen=True)
class PipelineCost:
    """An in-process run's CPU (and GIL, when sampled) per image, as the server steps report it."""

    cpu_ms_img: float
    cpu_roles_ms_img: dict[str, float]
    gil_pct: float | None = None
    gil_ms_img: float | None = None
    gil_roles_ms_img: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PreprocessReport:
    images: int
    card_ms: float  # the card's Pillow pipeline, float32 CHW out (normalisation included)
    own_ms: float  # preprocess_encoded: decode + crop, uint8 out
    normalize_ms: float  # mobiserve's normalisation of that crop (in the server: once per batch)
    own_total_ms: float
    speedup: float  # card_ms / own_total_ms


def card_preprocess(data: bytes) -> np.ndarray:
    """The model card's preprocessing written plainly with Pillow, as the contract check does."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR)
    w, h = im.size
    left, top = (w - 224) // 2, (h - 224) // 2
    return ((np.asarray(im.crop((left, top, left + 224, top + 224)), np.float32) / 255 - _MEAN) / _STD).transpose(
        2, 0, 1
    )


def measure(config: ModelConfig, data: Sequence[bytes], seconds: float, threads: int, gil: bool = False) -> Baseline:
    """`config` resolved (instances and threads filled), as the server runs it. `gil`: sample
    this process's GIL with py-spy during the two pipelines' runs."""
    card_img_s, card_latency, card_cpu = _card(config.path, data, seconds, threads, gil)
    own_img_s, own_latency, own_cpu = _own(config, data, seconds, threads, gil)
    ort = _ort(config, seconds / 4)
    ort_img_s = {b: img_s for b, (img_s, _) in ort.items()}
    best = max(ort_img_s, key=lambda b: ort_img_s[b])
    return Baseline(
        model=config.path,
        seconds=seconds,
        threads=threads,
        card_img_s=card_img_s,
        own_img_s=own_img_s,
        card_latency_ms=card_latency,
        own_latency_ms=own_latency,
        own_batch=config.max_batch_size,
        ort_img_s=ort_img_s,
        ort_best_img_s=ort_img_s[best],
        ort_best_batch=best,
        card_cpu=card_cpu,
        own_cpu=own_cpu,
        ort_cpu_ms={b: cpu for b, (_, cpu) in ort.items()},
    )


def _cost(cost: Cost | None, images: int) -> PipelineCost | None:
    if cost is None or not images:
        return None
    gil = cost.gil
    return PipelineCost(
        cpu_ms_img=round(1000 * cost.cpu_s / images, 3),
        cpu_roles_ms_img=per_image_ms(cost.by_role_s, images),
        gil_pct=None if gil is None else round(100 * gil.held, 1),
        gil_ms_img=None if gil is None else round(1000 * gil.held_s / images, 3),
        gil_roles_ms_img={} if gil is None else per_image_ms(gil.by_role_s, images),
    )


def _card(
    path: str, data: Sequence[bytes], seconds: float, threads: int, gil: bool
) -> tuple[float, float, PipelineCost | None]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    with os_threads.creating_threads_as("ort-card"):
        session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    latency = _latency(lambda b: session.run(None, {name: card_preprocess(b)[None]}), data)
    run = lambda x: session.run(None, {name: x})
    stack = lambda prepared: np.stack(list(prepared))
    with _pool(threads) as pool:
        img_s, cost = _pipeline(card_preprocess, stack, run, data, CARD_BATCH, pool, seconds, loops=1, gil=gil)
    return img_s, latency, cost


def _pool(threads: int) -> ThreadPoolExecutor:
    """Preprocessing threads named as the server's, so that their CPU is told apart the same way."""
    return ThreadPoolExecutor(threads, thread_name_prefix="preprocess", initializer=os_threads.name_current)


def _own(
    config: ModelConfig, data: Sequence[bytes], seconds: float, threads: int, gil: bool
) -> tuple[float, float, PipelineCost | None]:
    model = load_model(config)
    limits = ImageLimits()

    def prepare(data: bytes) -> np.ndarray:
        return preprocess_encoded(data, limits)

    latency = _latency(lambda b: model.infer([prepare(b)]), data)
    with _pool(threads) as pool:
        img_s, cost = _pipeline(
            prepare, list, model.infer, data, config.max_batch_size, pool, seconds, loops=config.instances, gil=gil
        )
    return img_s, latency, cost


def _latency(one: Callable[[bytes], object], data: Sequence[bytes]) -> float:
    times = []
    for b in data[:LATENCY_IMAGES]:
        t = time.perf_counter()
        one(b)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _pipeline(
    prepare: Callable[[bytes], np.ndarray],
    collect: Callable[[Iterator[np.ndarray]], Any],
    infer: Callable[[Any], object],
    data: Sequence[bytes],
    batch: int,
    pool: ThreadPoolExecutor,
    seconds: float,
    loops: int,
    gil: bool = False,
) -> tuple[float, PipelineCost | None]:
    """check_perf's loop: while a batch runs, the pool prepares the next one. `loops` such loops
    run at once (one per session instance) on the shared pool; images/s over all of them, and
    this process's CPU per image inferred by thread role (the one batch prepared ahead and not
    run adds its preprocessing to the others': ~1/(seconds x img/s / batch) of it)."""
    counts = [0] * loops

    def loop(k: int) -> None:
        i = k * batch * 7
        pending = pool.map(prepare, [data[(i + j) % len(data)] for j in range(batch)])
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            items = collect(pending)
            i += batch
            pending = pool.map(prepare, [data[(i + j) % len(data)] for j in range(batch)])
            infer(items)
            counts[k] += batch

    elapsed, cost = _in_threads(loop, loops, Probe(os.getpid(), gil))
    return sum(counts) / elapsed, _cost(cost, sum(counts))


def _ort(config: ModelConfig, seconds: float) -> dict[int, tuple[float, float]]:
    """onnxruntime alone, the server's sessions and tuning, on ready float32 inputs: per batch
    size, images/s and this process's ms of CPU per image."""
    tuning = SessionTuning(intra_op_threads=config.intra_op_threads, allow_spinning=config.allow_spinning)
    with os_threads.creating_threads_as("ort-alone"):
        sessions = [open_session(config.path, tuning) for _ in range(config.instances)]
    name = sessions[0].get_inputs()[0].name
    rng = np.random.default_rng(0)
    result: dict[int, tuple[float, float]] = {}
    for batch in sorted({*ORT_BATCHES, config.max_batch_size}):
        x = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)
        for s in sessions:
            s.run(None, {name: x})
        counts = [0] * len(sessions)

        def loop(k: int, x: np.ndarray = x, counts: list[int] = counts, batch: int = batch) -> None:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                sessions[k].run(None, {name: x})
                counts[k] += batch

        elapsed, cost = _in_threads(loop, len(sessions), Probe(os.getpid()))
        cpu_ms = round(1000 * cost.cpu_s / sum(counts), 3) if cost is not None and counts else float("nan")
        result[batch] = (sum(counts) / elapsed, cpu_ms)
    return result


def _in_threads(loop: Callable[[int], None], n: int, probe: Probe) -> tuple[float, Cost | None]:
    """Run loop(0) .. loop(n - 1) at once, one thread each (named infer_K, their role in the CPU
    report); seconds until all are done, and what `probe` read over that time. The probe stops
    before the threads end: an ended thread's CPU is no longer told apart by role."""
    finished = threading.Barrier(n + 1)
    release = threading.Event()

    def named(k: int) -> None:
        os_threads.set_name(f"infer_{k}")
        try:
            loop(k)
        finally:
            finished.wait()
            release.wait()

    probe.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=named, args=(k,), name=f"infer_{k}") for k in range(n)]
    for t in threads:
        t.start()
    finished.wait()
    elapsed = time.perf_counter() - t0
    cost = probe.stop()
    release.set()
    for t in threads:
        t.join()
    return elapsed, cost


def preprocess_report(data: Sequence[bytes]) -> PreprocessReport:
    """Single-thread ms per image, medians over the same images, each pipeline run once unmeasured."""
    limits = ImageLimits()
    card, own, norm = [], [], []
    card_preprocess(data[0])
    assemble([preprocess_encoded(data[0], limits)])
    for b in data:
        t0 = time.perf_counter()
        card_preprocess(b)
        t1 = time.perf_counter()
        crop = preprocess_encoded(b, limits)
        t2 = time.perf_counter()
        assemble([crop])
        t3 = time.perf_counter()
        card.append(t1 - t0)
        own.append(t2 - t1)
        norm.append(t3 - t2)
    card_ms, own_ms, norm_ms = (1000 * statistics.median(x) for x in (card, own, norm))
    total = 1000 * statistics.median([a + b for a, b in zip(own, norm)])
    return PreprocessReport(len(data), card_ms, own_ms, norm_ms, total, card_ms / total)
