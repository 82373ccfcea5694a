"""How a long stage's process gives freed memory back to the system (glibc's malloc).

glibc serves a block of at least its mmap threshold with a mapping of its own, returned when
the block is freed, and smaller ones from the heap, which shrinks only from its top. The
threshold is dynamic: each time a mapped block is freed it rises to that block's size (up to
32 MiB), so the large, short-lived buffers of a stage that runs for hours (prompts, HTTP bodies,
growing tables) move into the heap, and long-lived blocks allocated between them pin the freed
space: the resident size grows with the work done although the memory in use does not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h
LARGE_BLOCK_BYTES = 64 * 1024


def map_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Fix the mmap threshold at `threshold` bytes for the rest of the process (which also ends its
    dynamic rise), so that every block that large is unmapped when freed. False where the C
    library is not glibc (musl and macOS map large blocks anyway)."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    done = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    log.debug("mmap threshold fixed at %d bytes: %s", threshold, done)
    return done
