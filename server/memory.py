"""Process-wide allocator settings for a long-running server.

glibc raises its mmap threshold every time a large block (above the threshold, up to 32 MiB) is
freed, so after the first 20 MiB request the next ones are carved from the heaps instead of
mapped, and the freed space stays in the process: RSS climbs by a few hundred MB after a burst
of large requests (valid or not) and stays there. A fixed threshold (which also turns the
dynamic adjustment off, see mallopt(3)) keeps blocks above 1 MiB mapped, so they go back to the
system when freed. Typical requests (JPEGs of a few hundred KB) and the per-image tensors stay
below it; a 32-image batch tensor is mapped per batch, which costs well under a millisecond.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # <malloc.h>


def return_large_blocks_to_the_system() -> bool:
    """Fix glibc's mmap threshold; a no-op elsewhere (musl, macOS). True if it was set."""
    if platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    mallopt = ctypes.CDLL(name).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
