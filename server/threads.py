"""Operating-system names for the server's threads, so that each one's role shows from outside.

Python 3.11 names threads only for itself: the kernel sees every thread under the process's
name. Named threads show by role in `top -H`, `ps -L`, `/proc/<pid>/task/<tid>/comm` and in
`mobiserve bench`'s CPU report, per worker process:

- the main thread (thread id = process id) runs the event loop;
- `preprocess_N`, the preprocessing pool; `infer-<model>_N`, a model's inference threads;
- `ort-<model>`, onnxruntime's intra-op pools: a new thread inherits its creator's name, so the
  sessions are opened under it (`creating_threads_as`);
- `grpc-poller`, grpc.aio's completion-queue poller (a Python thread gRPC starts);
  gRPC core names its own (`grpc_global_tim`, `event_engine`, `lifeguard`, ...).

Linux only (prctl and /proc); elsewhere every call does nothing. The kernel keeps 15 bytes.

Threads that do bulk work run at a lower OS priority (a higher nice value, `lower_priority`), so
that the kernel runs interactive work first on the cores they share, in this process and in the
other workers alike. A thread can lower its own priority but not raise it again: only threads
made for bulk work are lowered, and native pools are created from a thread lowered for them
(`run_at_lower_priority`), whose priority they inherit.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

V = TypeVar("V")

_PR_SET_NAME = 15
_PR_GET_NAME = 16
NAME_BYTES = 15


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_prctl = _load_prctl()


def set_name(name: str) -> None:
    """Name the calling thread for the OS."""
    if _prctl is not None:
        _prctl(_PR_SET_NAME, name.encode("utf-8", "replace")[:NAME_BYTES], 0, 0, 0)


def get_name() -> str:
    """The calling thread's OS name ('' where unknown)."""
    if _prctl is None:
        return ""
    buffer = ctypes.create_string_buffer(NAME_BYTES + 1)
    _prctl(_PR_GET_NAME, buffer, 0, 0, 0)
    return buffer.value.decode("utf-8", "replace")


def name_current() -> None:
    """Give the calling thread its Python name as its OS name: a ThreadPoolExecutor `initializer`."""
    set_name(threading.current_thread().name)


@contextmanager
def creating_threads_as(name: str) -> Iterator[None]:
    """Threads started inside the block by native code (onnxruntime's pools) inherit `name`;
    the calling thread gets its own name back afterwards."""
    previous = get_name()
    set_name(name)
    try:
        yield
    finally:
        set_name(previous)


def name_thread(thread: threading.Thread, name: str) -> None:
    """Name another thread of this process (through /proc; nothing happens where that fails)."""
    if thread.native_id is None or not sys.platform.startswith("linux"):
        return
    try:
        with open(f"/proc/self/task/{thread.native_id}/comm", "w") as comm:
            comm.write(name[:NAME_BYTES])
    except OSError:
        pass


def name_grpc_poller() -> None:
    """grpc.aio polls its completion queue in a Python thread of its own, started with the first
    server or channel; call after creating the server. (Found by its target's name: gRPC's detail.)"""
    for thread in threading.enumerate():
        if "_poll_wrapper" in thread.name:
            name_thread(thread, "grpc-poller")


def lower_priority(by: int) -> None:
    """Raise the calling thread's nice value by `by` (0: leave it). Linux nice values are per
    thread; a thread cannot lower its nice value again without privileges."""
    if by > 0 and sys.platform.startswith("linux"):
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
        except OSError:
            pass


def run_at_lower_priority(by: int, work: Callable[[], V]) -> V:
    """`work()` in a thread of its own at a priority lowered by `by`: the threads it starts (an
    onnxruntime session's pool) inherit that priority; the caller keeps its own."""
    if by <= 0:
        return work()
    with ThreadPoolExecutor(1, initializer=lower_priority, initargs=(by,)) as one:
        return one.submit(work).result()


def pool_initializer(nice: int = 0) -> Callable[[], None]:
    """A ThreadPoolExecutor `initializer`: the OS name of the thread, and its priority lowered by `nice`."""

    def initialize() -> None:
        name_current()
        lower_priority(nice)

    return initialize
