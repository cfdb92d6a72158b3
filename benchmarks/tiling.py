"""Tiling throughput: fedpath's reading pipeline against raw OpenSlide on the same coordinates.

The pipeline figure includes everything a site pays: thumbnail, tissue mask, grid, reading each
tile, compositing on white and turning it into a tensor. Raw is ``read_region`` alone over the
same coordinates. Both read a generated 20x JPEG-tiled pyramid at 0.5 µm/px, 299-px tiles.
``workers2_speedup`` compares two reader processes (``client/tile_reader.py``) with the fastest single-process
path, the in-process reader (no worker process). The slide's size is fixed (``SLIDE_PX``) and
stated in docs/benchmarks.md: a figure that misses its goal is reported, not re-measured on
another size.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from client.site_config import TilingConfig
from client.slides import open_slide
from client.tile_datasets import SlideTiles, plan_slide
from client.tile_reader import tile_batches
from simulations.slide_generator import LABELS, SlideSpec, make_slide, site_stain


def _slide(folder: Path, size: int) -> Path:
    rng = np.random.default_rng(0)
    return make_slide(folder / "bench.tif", LABELS[1], SlideSpec(width=size, height=size), site_stain(rng), rng).path


def _raw(path: Path, coords: np.ndarray, level: int, size: int) -> float:
    slide = open_slide(path)
    start = time.perf_counter()
    for x, y in coords:
        slide.read_region((int(x), int(y)), level, (size, size))
    elapsed = time.perf_counter() - start
    slide.close()
    return len(coords) / elapsed


def _pipeline(path: Path, tiling: TilingConfig, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    plan = plan_slide(path, tiling, None)
    count = sum(len(batch) for batch in tile_batches(SlideTiles(path, plan.grid.coords, plan.read), 16, workers))
    return count / (time.perf_counter() - start), count


SLIDE_PX = 12288  # level-0 side: about 950 tiles of 299 px, enough to amortise starting worker processes
QUICK_SLIDE_PX = 4096


def run(quick: bool) -> dict:
    size, repeats = (QUICK_SLIDE_PX, 1) if quick else (SLIDE_PX, 3)
    tiling = TilingConfig(target_mpp=0.5, tile_size=299, min_tissue=0.25)
    with tempfile.TemporaryDirectory() as tmp:
        path = _slide(Path(tmp), size)
        plan = plan_slide(path, tiling, None)
        coords = plan.grid.coords
        _raw(path, coords, plan.read.level, plan.read.read_size)  # warm the OS file cache for both sides
        raw, in_process, one, two = [], [], [], []
        for _ in range(repeats):  # interleaved, so drift in machine speed hits every setting alike
            raw.append(_raw(path, coords, plan.read.level, plan.read.read_size))
            in_process.append(_pipeline(path, tiling, workers=0)[0])
            one.append(_pipeline(path, tiling, workers=1)[0])
            two.append(_pipeline(path, tiling, workers=2)[0])
    raw_tps, pipe_tps, two_tps = float(np.median(raw)), float(np.median(in_process)), float(np.median(two))
    return {
        "slide_px": size, "tile_size": tiling.tile_size, "target_mpp": tiling.target_mpp, "tiles": len(coords),
        "repeats": repeats,
        "pipeline_tiles_per_s": round(pipe_tps, 1),  # in-process reader (num_workers 0)
        "raw_tiles_per_s": round(raw_tps, 1),
        "ratio": round(pipe_tps / raw_tps, 3),
        "workers1_tiles_per_s": round(float(np.median(one)), 1),
        "workers2_tiles_per_s": round(two_tps, 1),
        "workers2_speedup": round(two_tps / pipe_tps, 3),  # against the in-process reader, not one worker
    }
