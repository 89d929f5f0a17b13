"""glibc malloc tuning for CPU inference: freed activation buffers are reused, not unmapped.

A prefill step allocates activations of tens of MB per layer. glibc serves blocks above
its mmap threshold with a fresh mmap and unmaps them when freed, so every step faults
its activations in again, page by page, and the kernel zeroes each page. Raising the mmap
and trim thresholds keeps freed blocks in the heap for the next step. vLLM's CPU backend
gets the same by preloading tcmalloc. On the 768x12 benchmark shape a prefill of 32 x 128
tokens took 3.4-6.6 s without this and 2.8-3.2 s with it (2 cores; docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # <malloc.h>: free() returns heap top above this to the OS
M_MMAP_THRESHOLD = -3  # <malloc.h>: blocks at least this big get their own mmap
KEEP_BYTES = 1 << 30


def keep_freed_memory(limit: int = KEEP_BYTES) -> bool:
    """Serve blocks below `limit` from the heap and keep up to `limit` of freed memory.

    Process-wide and only meaningful with glibc: the engine calls it once when it runs on
    the CPU (LORAPLEX_CPU_KEEP_FREED_MEMORY=0 turns it off). True if glibc took both."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, limit))
    if not ok:
        logger.debug("mallopt refused the thresholds; CPU steps re-fault their activations")
    return ok
