"""Freed memory goes back to the system during long runs (shared/memory.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.memory import _TRIM, FreeMemory

# In a fresh interpreter: after one 8 MB block is freed, glibc serves blocks up to that size from its
# heap; 4 MB blocks interleaved with small ones that stay, then freed, stay resident until trimmed.
FRAGMENTED = """
import os
from shared.memory import FreeMemory
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
big = bytearray(8 << 20); del big
blocks, keep = [], []
for _ in range(100):
    blocks.append(bytearray(4 << 20)); keep.append(bytearray(64 << 10))
blocks.clear()
freed = rss()
released = FreeMemory(every_s=0)()
print(freed, rss(), released)
"""


@pytest.mark.skipif(_TRIM is None, reason="the C library here has no malloc_trim (not glibc)")
def test_freed_heap_blocks_leave_the_resident_set():
    out = subprocess.run([sys.executable, "-c", FRAGMENTED], capture_output=True, text=True, check=True,
                         cwd=os.getcwd(), timeout=600).stdout.split()
    freed, trimmed, released = int(out[0]), int(out[1]), out[2]
    assert released == "True"
    assert freed - trimmed > 300e6  # the 400 MB of freed blocks, give or take the allocator's own


def test_releases_at_most_once_per_interval():
    free = FreeMemory(every_s=3600)
    assert free() is False  # the interval starts at creation
    free.last -= 3601
    assert free() is (_TRIM is not None)
    assert free() is False
    assert free(now=True) is (_TRIM is not None)  # the end of a loop: whenever it was last done
