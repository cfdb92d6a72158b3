"""Handing memory a long run has freed back to the operating system.

glibc's malloc keeps what a process frees: only free memory at the top of its heap goes back to
the system, free blocks between live ones stay resident. The trunk's loop allocates and frees tens
of MB per batch (tiles, activations) among small results that live until the slide is done, so on
a scanner-size slide the heap of `prepare` kept growing by about 0.3 MB per tile: 2.4 GB resident
after 4,000 tiles, of which `malloc_trim(0)`, called from a debugger in the running process,
returned 1.3 GB at once (2026-12-02). Nothing was leaked; it was never handed back.

``FreeMemory`` calls glibc's ``malloc_trim(0)``, which also releases the free pages inside the
heap, at most once every ``every_s`` seconds: pages it returns must be faulted in again when the
next batches need them (about 5 % slower when done every 2 s, within this machine's noise). Where
the C library is not glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Callable


def _libc_function(name: str) -> Callable[..., int] | None:
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):  # no such library, or a C library without this function (not glibc)
        return None


_TRIM = _libc_function("malloc_trim")
_MALLOPT = _libc_function("mallopt")


def keep_freed_memory() -> None:
    """The opposite trade, for short-lived worker processes of our own: have glibc keep freed blocks
    for reuse. By default it returns blocks above 128 KB (a tile's float arrays) to the system and
    faults them in afresh for the next tile: 18 % of the CPU time of a streamed slide in
    ``simulations/pyramidal_tiff.py`` (9000 x 8000 px: 19.6 s of CPU against 16.0, 756,000 page
    faults against 42,000, same peak RSS; measured). Elsewhere than glibc, nothing to do."""
    if _MALLOPT is None:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    _MALLOPT(m_mmap_threshold, 64 << 20)
    _MALLOPT(m_trim_threshold, 256 << 20)


class FreeMemory:
    """Call it often (after every batch); it returns freed memory at most every ``every_s`` seconds.

    Args:
        every_s: the shortest time between two returns.
    """

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self.last = time.monotonic()

    def __call__(self, now: bool = False) -> bool:
        """True if memory was handed back now. ``now``: whenever it was last done (at the end of a long loop,
        before the next stage allocates)."""
        if _TRIM is None or (not now and time.monotonic() - self.last < self.every_s):
            return False
        _TRIM(0)
        self.last = time.monotonic()
        return True
