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
from mobiserve.server.cores import CoreLedger
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
    """`instances` narrow sessions of one ONNX file and an all-core path; `infer` may be called from
    `instances` threads at once.

    `infer` picks the session for each batch:
    - a narrow session: `intra_op_threads` threads each, spinning off so that idle intra-op
      threads leave the cores to preprocessing. With one worker per core (the default) that is one
      thread, the cheapest CPU per image, and onnxruntime then runs the batch on the calling thread
      itself: at that thread's OS priority (bulk work's inference threads run below interactive
      work's, threads.py);
    - the all-core path, for work that may widen (`widen`; the server's interactive work) while no
      other run of this server needs those cores (`CoreLedger`): small batches (a lone request on an
      idle server) on a session of `lone_threads` threads that spin between operators (waking them
      at every operator costs ~0.4 ms of a ~2.5 ms batch-1 run, and small batches only happen when
      the server is lightly loaded, so spinning costs nothing then); larger batches, when this
      worker is the only busy one (its clients' connections all landed on it), on a non-spinning
      session of `lone_threads` threads.
    All sessions run the same kernels on the same model: same results.
    """

    def __init__(
        self,
        path: str | Path,
        labels: Labels,
        tuning: SessionTuning,
        instances: int = 1,
        lone_threads: int = 0,
        ledger: CoreLedger | None = None,
        open_session: SessionOpener = open_session,  # tests pass one whose sessions they can hold
    ):
        self.path = str(path)
        self.sha256 = sha256_of(Path(path)) if Path(path).is_file() else ""
        self.labels = labels
        self.tuning = tuning
        self.instances = instances
        self.lone_threads = lone_threads or tuning.intra_op_threads
        self.ledger = ledger or CoreLedger(max(self.lone_threads, tuning.intra_op_threads * instances))
        if not Path(path).is_file():
            raise ModelLoadError(f"model file not found: {path}")
        wide = replace(tuning, intra_op_threads=self.lone_threads)
        try:
            with threads.creating_threads_as(f"ort-{Path(path).stem}"):  # onnxruntime's pools inherit the name
                sessions = [open_session(self.path, tuning) for _ in range(instances)]
                same = tuning.allow_spinning and self.lone_threads == tuning.intra_op_threads
                self._lone = None if same else open_session(self.path, replace(wide, allow_spinning=True))
                self._wide = open_session(self.path, wide) if self.lone_threads > tuning.intra_op_threads else None
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
        self._lone_busy = threading.Lock()
        self._wide_busy = threading.Lock()

    def infer(self, items: Sequence[np.ndarray], widen: bool = True) -> BatchScores:
        """uint8 crops / float32 inputs -> scores. Blocks on a free session if all are busy.
        widen: may take the all-core path (else a narrow session, whatever the cores do)."""
        batch = assemble(items, _input_buffer(len(items)))
        with self._session(len(items), widen) as session:
            logits = self._run(session, batch)
        return BatchScores(logits, softmax(logits), rank(logits))

    def warm_up(self, max_batch_size: int) -> None:
        """Run every session at each batch size it will meet first: allocations happen now,
        not on the first caller's request."""
        sessions = [self._free.get() for _ in range(self.instances)]
        try:
            runs = [(session, sorted({1, max_batch_size})) for session in sessions]
            if self._lone is not None:
                runs.append((self._lone, list(range(1, SMALL_BATCH + 1))))
            if self._wide is not None:
                runs.append((self._wide, sorted({SMALL_BATCH + 1, max_batch_size})))
            for session, sizes in runs:
                for n in sizes:
                    self._run(session, np.zeros((n, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32))
        finally:
            for session in sessions:
                self._free.put(session)

    @contextmanager
    def _session(self, batch_size: int, widen: bool = True) -> Iterator[ort.InferenceSession]:
        """The all-core path when asked for, its cores are free and its session too; else a narrow session."""
        session, busy = (self._lone, self._lone_busy) if batch_size <= SMALL_BATCH else (self._wide, self._wide_busy)
        if widen and session is not None and self.ledger.free_for(self.lone_threads) and busy.acquire(blocking=False):
            try:
                with self.ledger.running(self.lone_threads):
                    yield session
            finally:
                busy.release()
            return
        session = self._free.get()
        try:
            with self.ledger.running(self.tuning.intra_op_threads):
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
