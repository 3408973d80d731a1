"""A loaded classifier: onnxruntime sessions plus labels. Blocking; runs in executor threads."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from mobiserve.common import zoo
from mobiserve.common.labels import Labels
from mobiserve.common.zoo import sha256_of
from mobiserve.server import threads
from mobiserve.server.errors import ModelLoadError
from mobiserve.server.processing.normalize import assemble
from mobiserve.server.processing.postprocess import rank, softmax
from mobiserve.server.processing.preprocess import INPUT_SIZE
from mobiserve.server.runtime.session import SessionTuning, open_session


@dataclass(frozen=True)
class BatchScores:
    """Per image of a batch: the model's raw scores, their softmax, and class indices, most probable first."""

    logits: np.ndarray  # [N, C] float32, the model's output
    probabilities: np.ndarray  # [N, C] float32
    order: np.ndarray  # [N, C] int64


SMALL_BATCH = 2  # batches up to this size may take the spinning session (see Model)
SessionOpener = Callable[[str, SessionTuning], ort.InferenceSession]


class Model:
    """`instances` sessions of one ONNX file; `infer` may be called from that many threads at once.

    With spinning off (the default, so idle intra-op threads leave the cores to preprocessing),
    a lone image pays for waking onnxruntime's threads at every operator, a good part of a
    batch-1 run (docs/performance.md). So one extra session whose threads spin takes small
    batches when it is free: small batches only happen when the server is lightly loaded, which
    is exactly when spinning costs nothing. Both sessions run the same kernels with the same
    threads: same results.

    `spare_threads`: one more session, not spinning, with that many threads, which
    `infer(spare=True)` runs on when it is free: urgent work beside batches that hold the others.
    `nice`: the regular sessions' threads run at an OS priority lowered by this much, so that the
    kernel runs the spinning and the spare session's work first (threads.run_at_lower_priority).
    """

    def __init__(
        self,
        path: str | Path,
        labels: Labels,
        tuning: SessionTuning,
        instances: int = 1,
        open_session: SessionOpener = open_session,  # tests pass one whose sessions they can hold
        spare_threads: int = 0,
        nice: int = 0,
    ):
        self.path = str(path)
        self.sha256 = sha256_of(Path(path)) if Path(path).is_file() else ""
        self.labels = labels
        self.tuning = tuning
        self.instances = instances
        if not Path(path).is_file():
            raise ModelLoadError(f"model file not found: {path}")
        pool_name = f"ort-{Path(path).stem}"

        def open_regular() -> list[ort.InferenceSession]:
            with threads.creating_threads_as(pool_name):  # onnxruntime's pools inherit the name (and priority)
                return [open_session(self.path, tuning) for _ in range(instances)]

        try:
            sessions = threads.run_at_lower_priority(nice, open_regular)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot load {path} with onnxruntime: {first_line}{_repair(Path(path))}") from None
        self.input_name, self.output_name, self.num_classes = _check_signature(sessions[0], path)
        if self.num_classes != len(labels):
            raise ModelLoadError(
                f"{path} has {self.num_classes} outputs but the synsets file lists {len(labels)} classes"
            )
        self._free: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        for session in sessions:
            self._free.put(session)
        with threads.creating_threads_as(pool_name):
            self._spinning = (
                None if tuning.allow_spinning else open_session(self.path, replace(tuning, allow_spinning=True))
            )
            self._spare = (
                None
                if not spare_threads
                else open_session(self.path, replace(tuning, intra_op_threads=spare_threads, allow_spinning=False))
            )
        self._spinning_busy = threading.Lock()
        self._spare_busy = threading.Lock()

    def infer(self, items: Sequence[np.ndarray], spare: bool = False) -> BatchScores:
        """uint8 crops / float32 inputs -> scores. Blocks on a free session if all are busy.
        spare: on the spare session, if there is one and it is free."""
        batch = assemble(items, _input_buffer(len(items)))
        with self._session(len(items), spare) as session:
            logits = self._run(session, batch)
        return BatchScores(logits, softmax(logits), rank(logits))

    def warm_up(self, max_batch_size: int) -> None:
        """Run every session at each batch size it will meet first: allocations happen now,
        not on the first caller's request."""
        sessions = [self._free.get() for _ in range(self.instances)]
        try:
            runs = [(session, sorted({1, max_batch_size})) for session in sessions]
            for small in (self._spinning, self._spare):
                if small is not None:
                    runs.append((small, list(range(1, SMALL_BATCH + 1))))
            for session, sizes in runs:
                for n in sizes:
                    self._run(session, np.zeros((n, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32))
        finally:
            for session in sessions:
                self._free.put(session)

    @contextmanager
    def _session(self, batch_size: int, spare: bool = False) -> Iterator[ort.InferenceSession]:
        """The spare session when asked for and free; the spinning session for a small batch when
        it is free; else a regular one."""
        if spare and self._spare is not None and self._spare_busy.acquire(blocking=False):
            try:
                yield self._spare
            finally:
                self._spare_busy.release()
            return
        if self._spinning is not None and batch_size <= SMALL_BATCH and self._spinning_busy.acquire(blocking=False):
            try:
                yield self._spinning
            finally:
                self._spinning_busy.release()
            return
        session = self._free.get()
        try:
            yield session
        finally:
            self._free.put(session)

    def _run(self, session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
        logits: np.ndarray = session.run([self.output_name], {self.input_name: batch})[0]
        return logits


def _repair(path: Path) -> str:
    """For a file named as one of the zoo's: how to fetch it again."""
    model = zoo.by_filename(path)
    if model is None:
        return ""
    return (
        f". It is named as the zoo's {model.name} model, so it may be damaged or cut short: "
        f"`mobiserve models pull {model.name} --dir {path.parent}` fetches it again"
    )


def _check_signature(session: ort.InferenceSession, path: str | Path) -> tuple[str, str, int]:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) < 1:
        raise ModelLoadError(f"{path}: expected one input and one output, got {len(inputs)} and {len(outputs)}")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1:] != [3, INPUT_SIZE, INPUT_SIZE] or inputs[0].type != "tensor(float)":
        raise ModelLoadError(
            f"{path}: input {inputs[0].name!r} is {inputs[0].type} {shape}; "
            f"expected float [N, 3, {INPUT_SIZE}, {INPUT_SIZE}]"
        )
    out_shape = list(outputs[0].shape)
    if len(out_shape) != 2 or not isinstance(out_shape[1], int):
        raise ModelLoadError(f"{path}: output {outputs[0].name!r} has shape {out_shape}; expected [N, classes]")
    return inputs[0].name, outputs[0].name, out_shape[1]


_thread = threading.local()


def _input_buffer(n: int) -> np.ndarray:
    """This thread's reusable model input for a batch of `n` (an inference thread runs one batch
    at a time). A fresh array per batch cost its page faults every time, and above glibc's mmap
    threshold an mmap and munmap too: a good part of the server's throughput (docs/performance.md)."""
    buffer: np.ndarray | None = getattr(_thread, "input", None)
    if buffer is None or len(buffer) < n:
        buffer = _thread.input = np.empty((n, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    return buffer[:n]
