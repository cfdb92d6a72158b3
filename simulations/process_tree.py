"""A process and everything under it, from Linux's /proc: add up their memory, name them, pause them.

A simulation's SuperLink starts Flower's executor in a session of its own, which starts the
simulation process, which starts Ray's processes and workers: memory must be counted over the
whole tree (``shared/processes.descendants``; ``shared/processes.stop`` stops it whole). A benchmark
that compares a command with something measured alone in the same minutes pauses the command's whole
tree meanwhile (``paused``): stopping only the root would leave its reader processes decoding beside it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.processes import descendants, signal_each

PROC = Path("/proc")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of ``pids`` together (processes gone meanwhile count 0)."""
    total = 0
    for pid in pids:
        try:
            total += int((PROC / str(pid) / "statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size of ``pids`` together: each shared page counted once over the processes
    sharing it (``/proc/PID/smaps_rollup``), so unlike summed RSS it is what the tree really holds."""
    total = 0
    for pid in pids:
        try:
            for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, IndexError, ValueError):
            continue
    return total


def command_line(pid: int) -> str:
    """The process's command line, arguments joined by spaces ("" once it is gone)."""
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@contextmanager
def paused(root: int) -> Iterator[list[int]]:
    """``root`` and every process under it stopped (SIGSTOP) while the block runs, continued (SIGCONT) after it,
    whatever the block raises: a benchmark measures something else on the same cores meanwhile. The tree is
    listed again after each stop until nothing new appears, so a child started meanwhile is stopped too.
    Yields the stopped PIDs."""
    stopped: list[int] = []
    try:
        while new := sorted({root, *descendants(root)} - set(stopped)):
            stopped += new  # first: an interrupt between the two lines must still continue them
            signal_each(new, signal.SIGSTOP)
        yield stopped
    finally:
        signal_each(stopped, signal.SIGCONT)


class PeakMemory:
    """The peak memory of a process tree while the ``with`` block runs, sampled every ``interval`` s:
    summed RSS (``peak``; an upper bound: shared pages count once per process), per kind of process
    (``peak_by_kind``, with ``kind``), and with ``pss`` the summed proportional set size (``peak_pss``).

    Args:
        root: the tree's root process (default: this one).
        interval: seconds between samples.
        kind: names a process by its PID (e.g. "superlink"); None: every process is "all".
        pss: also sample PSS (``pss_bytes``; the kernel walks each process's page tables for it).
    """

    def __init__(self, root: int | None = None, interval: float = 0.5, kind: Callable[[int], str] | None = None,
                 pss: bool = False) -> None:
        self.root, self.interval, self.kind, self.pss = root or os.getpid(), interval, kind, pss
        self.peak = self.peak_pss = 0
        self.peak_by_kind: dict[str, int] = {}
        self._done, self._held = threading.Event(), threading.Event()

    def _sample(self) -> None:
        while not self._done.is_set():
            if self._held.is_set():
                self._done.wait(self.interval)
                continue
            tree = [self.root, *descendants(self.root)]
            by_kind: dict[str, int] = defaultdict(int)
            for pid in tree:
                by_kind[self.kind(pid) if self.kind else "all"] += rss_bytes([pid])
            self.peak = max(self.peak, sum(by_kind.values()))
            for name, rss in by_kind.items():
                self.peak_by_kind[name] = max(self.peak_by_kind.get(name, 0), rss)
            if self.pss:
                self.peak_pss = max(self.peak_pss, pss_bytes(tree))
            self._done.wait(self.interval)

    @contextmanager
    def held(self) -> Iterator[None]:
        """No samples while the block runs: a tree that is ``paused`` does not change, and the sampler's
        walks of /proc would take CPU from what is measured meanwhile in this process."""
        self._held.set()
        try:
            yield
        finally:
            self._held.clear()

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
