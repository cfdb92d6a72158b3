"""Reader processes: the same batches as reading in-process, errors raised where the caller is,
no torch in a reader, and no reader left behind.

This module stays free of torch at import: its probe datasets travel to reader processes, which
import it to unpickle them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from client.slides import SlideError
from client.tile_reader import ReaderError, tile_batches


class Numbered:
    """Tile i is a 4 x 4 image filled with i (mod 256)."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> np.ndarray:
        return np.full((4, 4, 3), index % 256, dtype=np.uint8)


class ProcessFacts(Numbered):
    """Each tile says whether its process had torch imported, and which process read it."""

    def __getitem__(self, index: int) -> np.ndarray:
        tile = np.zeros((1, 2, 3), dtype=np.int64)
        tile[0, 0, 0] = "torch" in sys.modules
        tile[0, 1, 0] = os.getpid()
        return tile


class Crashing(Numbered):
    """A reader that dies without a word at tile ``at`` (a segfault in a decoder, say)."""

    def __init__(self, count: int, at: int):
        super().__init__(count)
        self.at, self.parent = at, os.getpid()

    def __getitem__(self, index: int) -> np.ndarray:
        if index == self.at and os.getpid() != self.parent:
            os._exit(3)
        return super().__getitem__(index)


def _children() -> set[int]:
    from shared.processes import descendants

    return set(descendants(os.getpid()))


@pytest.mark.parametrize("readers", [0, 1, 2, 3])
def test_batches_are_the_same_in_order_whatever_the_readers(readers):
    batches = list(tile_batches(Numbered(37), 8, readers))
    assert [len(b) for b in batches] == [8, 8, 8, 8, 5]
    assert np.concatenate(batches)[:, 0, 0, 0].tolist() == list(range(37))


def test_readers_do_not_import_torch_and_are_separate_processes():
    batches = list(tile_batches(ProcessFacts(6), 2, 2))
    facts = np.concatenate(batches)[:, 0, :, 0]
    assert facts[:, 0].tolist() == [0] * 6  # no reader imported torch
    pids = facts[:, 1].tolist()
    assert os.getpid() not in pids
    assert pids[0] == pids[1] == pids[4] == pids[5] != pids[2] == pids[3]  # batches alternate between readers


def test_one_batch_is_read_here_without_a_reader():
    facts = np.concatenate(list(tile_batches(ProcessFacts(2), 2, 2)))[:, 0, :, 0]
    assert facts[:, 1].tolist() == [os.getpid()] * 2


def test_an_error_in_a_reader_is_raised_here_with_its_reason():
    from client.slides import ReadPlan
    from client.tile_datasets import SlideTiles

    before = _children()  # pytest-xdist's process may hold children of earlier tests
    missing = Path("/nonexistent/slide.svs")
    tiles = SlideTiles(missing, np.zeros((40, 2), dtype=np.int64), ReadPlan(0, 96, 96, 96, 1.0, "test"))
    with pytest.raises(SlideError, match="file not found") as caught:
        list(tile_batches(tiles, 16, 1))
    assert caught.value.path == missing
    assert _children() <= before


def test_a_reader_that_dies_is_an_error_that_says_so():
    before = _children()
    with pytest.raises(ReaderError, match="exited with code 3"):
        list(tile_batches(Crashing(64, at=20), 8, 2))
    assert _children() <= before


def test_stopping_early_stops_the_readers():
    before = _children()
    batches = tile_batches(Numbered(400), 4, 2)
    next(batches)
    assert len(_children() - before) == 2
    batches.close()
    assert _children() <= before


def test_every_dataset_the_product_sends_a_reader_unpickles_without_torch(tmp_path):
    """A reader imports the module of each class it unpickles: none of them may bring torch (a
    dataset class defined in client/predict.py once made predict's reader 0.75 GB)."""
    import pickle
    import subprocess

    from client.slides import ReadPlan
    from client.tile_datasets import ImageTiles, SlideTiles, TimedTiles, TransformedTiles
    from simulations.stain_shift import StainShift

    slide = SlideTiles(tmp_path / "a.svs", np.zeros((1, 2), dtype=np.int64), ReadPlan(0, 96, 96, 96, 1.0, "test"))
    datasets = [slide, ImageTiles((tmp_path / "a.png",), 96), TimedTiles(slide),
                TransformedTiles(slide, StainShift(h_scale=1.1))]
    probe = "import pickle, sys; pickle.load(sys.stdin.buffer); print('torch' in sys.modules)"
    for dataset in datasets:
        out = subprocess.run([sys.executable, "-c", probe], input=pickle.dumps(dataset), capture_output=True,
                             check=True, timeout=600).stdout.decode().strip()
        assert out == "False", type(dataset).__name__
