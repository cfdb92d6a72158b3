"""Reader processes that decode tiles beside the trunk, without importing torch.

A slide of scanner size is read for many minutes while the trunk runs, so reading must overlap it
in other processes. torch's ``DataLoader`` workers are forks of the process that holds the trunk:
each one keeps the parent's torch libraries mapped, and with torch's CUDA build that is about
0.6 GB of resident pages per process, counted again for every reader in the site's memory (measured:
a 1-reader ``prepare`` summed 1.9 GB before its first batch). A reader here is a fresh interpreter
(``python -m client.tile_reader``) that imports only numpy, Pillow and OpenSlide, about 0.1 GB.

The parent sends the tile dataset (``client/tile_datasets.py``, plain picklable classes) on the
reader's stdin; the reader sends back whole batches, pickled, on its stdout, and an exception that
stops it as a last message. The pipe is the bounded queue: a reader blocks on writing its next
batch until the trunk's process takes it, so each reader runs at most one batch ahead, and memory
does not grow with the slide. With ``n`` readers, reader ``k`` reads batches ``k, k + n, ...`` and the
parent takes them in order.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from typing import Protocol

import numpy as np


class Tiles(Protocol):
    """Tiles by index: HWC uint8 arrays of one size (``client/tile_datasets.py``)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> np.ndarray: ...


class ReaderError(RuntimeError):
    """A reader process that ended without sending the batches it owed."""


def batch_at(tiles: Tiles, start: int, batch_size: int) -> np.ndarray:
    """Tiles ``start`` to ``start + batch_size`` (fewer at the end) as one [B, H, W, 3] array."""
    return np.stack([tiles[i] for i in range(start, min(start + batch_size, len(tiles)))])


def tile_batches(tiles: Tiles, batch_size: int, readers: int = 0) -> Iterator[np.ndarray]:
    """Batches of ``tiles`` in order, [B, H, W, 3] uint8, decoded by ``readers`` processes (0: here).

    Args:
        tiles: a picklable tile dataset (it travels to the readers).
        batch_size: tiles per batch; the last batch may be smaller.
        readers: reader processes; 0 reads in this process, between batches of the caller.

    An exception a reader raised (a corrupt tile, say) is raised here, as it would be in-process.
    Closing the iterator early (or an exception in the caller) stops the readers, by PID.
    """
    starts = range(0, len(tiles), batch_size)
    if readers <= 0 or len(starts) <= 1:
        for start in starts:
            yield batch_at(tiles, start, batch_size)
        return
    readers = min(readers, len(starts))
    processes = [_start_reader(tiles, batch_size, k, readers) for k in range(readers)]
    try:
        for number, _ in enumerate(starts):
            yield _receive(processes[number % readers])
    finally:
        for process in processes:
            _stop(process)


def _start_reader(tiles: Tiles, batch_size: int, index: int, every: int) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "client.tile_reader"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE)
    try:
        pickle.dump((tiles, batch_size, index, every), process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        process.stdin.close()
    except BaseException:
        _stop(process)
        raise
    return process


def _receive(process: subprocess.Popen) -> np.ndarray:
    try:
        kind, payload = pickle.load(process.stdout)
    except (EOFError, pickle.UnpicklingError):
        code = process.wait(timeout=10)
        raise ReaderError(f"a tile reader process (pid {process.pid}) exited with code {code} "
                          "before sending its tiles; see the lines above for why") from None
    if kind == "error":
        raise payload
    return payload


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    process.stdout.close()


def _serve(source, sink) -> None:
    """The reader's side: read the job from ``source``, write its batches to ``sink``."""
    tiles, batch_size, index, every = pickle.load(source)
    try:
        for start in range(index * batch_size, len(tiles), every * batch_size):
            pickle.dump(("batch", batch_at(tiles, start, batch_size)), sink, protocol=pickle.HIGHEST_PROTOCOL)
            sink.flush()
    except BrokenPipeError:  # the parent stopped early: nothing left to do
        return
    except Exception as exc:  # the parent raises it where an in-process read would have
        try:
            pickle.dump(("error", exc), sink, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # an exception that does not pickle still says what it was
            pickle.dump(("error", ReaderError(f"{type(exc).__name__}: {exc}")), sink)
        sink.flush()


if __name__ == "__main__":
    # Batches go out on a private copy of stdout; anything a library prints goes to stderr instead of
    # into the batch stream.
    sink = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    try:
        _serve(sys.stdin.buffer, sink)
    except BrokenPipeError:
        pass
