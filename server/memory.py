"""Process-wide allocator settings for a long-running server, and giving freed memory back.

glibc raises its mmap threshold every time a large block (above the threshold, up to 32 MiB) is
freed, so after the first 20 MiB request the next ones are carved from the heaps instead of
mapped, and the freed space stays in the process: RSS climbs by a few hundred MB after a burst
of large requests (valid or not) and stays there. A fixed threshold (which also turns the
dynamic adjustment off, see mallopt(3)) keeps blocks above 1 MiB mapped, so they go back to the
system when freed. Typical requests (JPEGs of a few hundred KB) and the per-image tensors stay
below it; a 32-image batch tensor is mapped per batch, which costs well under a millisecond.

Smaller blocks come from glibc's per-thread arenas, and a burst (streams of images that a client
never reads, then kills) leaves those arenas holding freed but unreturned memory after every
round, so that RSS climbs round after round with no live object more (docs/performance.md has
the figures). `trim_when_idle` returns it (malloc_trim) once the server has gone quiet after some work.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import platform
from collections.abc import Callable
from functools import cache

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # <malloc.h>


@cache
def _glibc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    return None if name is None else ctypes.CDLL(name)


def return_large_blocks_to_the_system() -> bool:
    """Fix glibc's mmap threshold; a no-op elsewhere (musl, macOS). True if it was set."""
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim() -> None:
    """Give the arenas' free memory back to the system (glibc's malloc_trim); a no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


async def trim_when_idle(busy: Callable[[], bool], work_done: Callable[[], int], every_s: float = 2.0) -> None:
    """Run for the server's life: after some work, once a whole interval passed with none and
    nothing is queued, trim (in a worker thread: it can take a few milliseconds)."""
    loop = asyncio.get_running_loop()
    trimmed = last = work_done()
    while True:
        await asyncio.sleep(every_s)
        done = work_done()
        if done != trimmed and done == last and not busy():
            await loop.run_in_executor(None, trim)
            trimmed = done
        last = done
