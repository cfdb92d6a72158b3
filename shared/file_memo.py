"""What a process computed from a file, kept while the file is unchanged: the warm site worker's memory.

A site's task runner (``client/task_runner.py``) serves every message of every round from one
process. Without this memory each round would hash the trunk file again for the pin check (about
100 MB), read it again for the frozen projection, and read every cached feature file of the training
set again, although none of them changed since the round before. With it, a round after the first
reads only the cache index (to see what ``prepare`` changed) and the files that are new.

A file is the same while its ``file_version`` is: device, inode, size, modification and change time
in nanoseconds (git's index trusts the same; the change time also moves on an in-place edit whose
modification time was set back). ``prepare`` and ``pretrain-encoder`` write files atomically
(a new inode), so anything they rewrite is read again. Entries are bounded in bytes and the least
recently used go first, so a site whose cache is larger than the bound still runs, reading what
does not fit as before.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_MAX_BYTES = 256 << 20


def file_version(stat: os.stat_result) -> tuple[int, ...]:
    """What changes whenever a file is written or replaced: device, inode, size, mtime and ctime (ns).
    Every "read again when the file changes" of fedpath (this memo, the hash-chained logs, the
    roster and key a site signs with, the registry the relay checks pushes against) compares these."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


class FileMemo:
    """Values computed from files, each kept while its file is unchanged.

    Args:
        max_bytes: the bound on the kept values' sizes (``size_of``); a value larger than it is not kept
            (0: nothing is kept). May be changed later: a process that serves many rounds raises it.
        size_of: a value's size in bytes (default: its ``nbytes``, else 0).
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, size_of: Callable[[Any], int] | None = None) -> None:
        self.max_bytes = max_bytes
        self.size_of = size_of or (lambda value: int(getattr(value, "nbytes", 0)))
        self._entries: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the task runner's heartbeat thread never calls in, but a ClientApp might
        self.hits = self.misses = 0

    def get(self, path: Path, compute: Callable[[Path], Any], *, kind: str = "") -> Any:
        """``compute(path)``, or the value it gave for the same unchanged file before (``kind`` keeps
        different values of one file apart). Errors of ``stat`` or ``compute`` propagate: nothing is
        kept for a file that could not be read."""
        key = (kind, os.path.abspath(path), *file_version(os.stat(path)))
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key][0]
        value = compute(path)
        size = self.size_of(value)
        with self._lock:
            self.misses += 1
            if size <= self.max_bytes and key not in self._entries:
                self._entries[key] = (value, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (_, dropped) = self._entries.popitem(last=False)
                    self._bytes -= dropped
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self.hits = self.misses = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)
