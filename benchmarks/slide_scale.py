"""A scanner-size slide through `prepare` and `predict`: memory that does not grow with the slide, and
reading that keeps up with the trunk.

One generated 80,000 x 60,000 px slide at 0.25 µm/px (40x; streamed to disk tile by tile,
``simulations/large_slide.py``) is tiled at 0.5 µm/px into 299-px tiles by the product's own
commands, each run as a hospital runs it, in a process of its own: ``fedpath-site prepare`` (an empty
cache: every tile read, through the trunk, cached) and ``fedpath-site predict`` (another empty cache:
every tile again, plus the head and each tile's importance). Reader processes (``features.num_workers``,
``client/tile_reader.py``) decode tiles while the trunk runs, each at most one batch ahead of it.

Figures:

- ``tiles``, ``*_seconds`` (wall time of the command, start-up included, the pauses below excluded) and
  ``*_tiles_per_s``;
- ``*_peak_rss_gb``: the largest sum of the resident memory of the command's process tree (it and its
  reader processes), sampled every 0.5 s from /proc. Pages a reader shares with its parent (torch's
  libraries) count twice, so this is an upper bound; ``*_peak_pss_gb`` counts each shared page once
  (proportional set size), what the tree really holds. Goal: ``peak_rss_gb`` ≤ 2 GB whatever the
  slide's size;
- ``trunk_alone_tiles_per_s``: the same extractor on ``TRUNK_SAMPLE`` of the same tiles (spread over the
  slide), read into memory first, with no reader beside it, at the same batch size, in this run, measured
  *during* ``prepare``: every ``SAMPLE_EVERY_S`` the benchmark stops the command's whole process tree
  (SIGSTOP), runs the trunk alone on the next ``SAMPLE_TILES`` of its sample (every fourth tile: each
  window spans the slide), and lets the command go on (SIGCONT). The command's own time excludes those
  pauses, and the memory sampler rests during them. This VM's speed drifts by 10-20 % within a
  15-minute command, which a baseline measured only before and after cannot follow; sampled through the
  command, both rates see the same minutes. ``trunk_alone_samples`` lists each pause's rate;
- ``overlap_ratio``: ``prepare_tiles_per_s`` / ``trunk_alone_tiles_per_s``. 1 means reading and
  everything else `prepare` does costs nothing beside the trunk. Goal: ≥ 0.9;
- ``predict_overlap_ratio``: the same for ``predict`` against the trunk alone sampled during it
  (``predict_trunk_alone_tiles_per_s``, ``predict_trunk_alone_samples``); a lower bound, as predict also
  explains every tile and draws;
- ``bracketed_*``: the earlier method, for comparison: the trunk alone on the whole sample just before
  and just after each command, the mean of the two as the baseline.

``--quick`` makes a 16,000 x 12,000 slide instead (about 250 tiles). ``--device`` runs the trunk there
(``features.device``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from client.feature_cache import FeatureCache
from client.features import extract_features, load_encoder
from client.site_config import load_site_config
from client.tile_datasets import SlideTiles, plan_slide
from shared.checkpoints import save_checkpoint
from shared.devices import resolve_device, trunk_batch_size
from shared.model import ModelConfig, build_head
from shared.parameters import model_arrays
from shared.processes import stop_pid, stop_signals
from simulations.process_tree import PeakMemory, paused
from simulations.slide_generator import LABELS, SlideSpec, Stain, make_slide

FULL_SIZE, QUICK_SIZE = (80_000, 60_000), (16_000, 12_000)
MPP, TARGET_MPP, TILE = 0.25, 0.5, 299
TRUNK_SAMPLE = 256  # tiles the trunk runs alone on (about 25 s on 2 CPU cores)
# One pause times 64 tiles (four CPU batches, about 7 s after one untimed batch): long enough that one
# batch's jitter does not decide it, short enough that pausing every 90 s of the command's own time adds
# about 10 % to the run's wall time while still seeing the VM's drift (minutes) about ten times per command.
SAMPLE_TILES = 64
SAMPLE_EVERY_S = {False: 90.0, True: 10.0}  # command time between two pauses (full, --quick)
TIME_LIMIT_S = 4 * 3600  # of the command's own time
READERS = 1  # reader processes beside the trunk (the site.example.yaml default)
GOAL_PEAK_RSS_GB, GOAL_OVERLAP = 2.0, 0.9


def _site_yaml(folder: Path, slide: Path, cache: Path, device: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.csv").write_text(f"slide,label,patient\n{slide},{LABELS[1]},p1\n")
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump({
        "name": folder.name, "data": {"manifest": "manifest.csv", "labels": list(LABELS)},
        "tiling": {"target_mpp": TARGET_MPP, "tile_size": TILE},
        "features": {"cache_dir": str(cache), "num_workers": READERS, "device": device, "batch_size": "auto"}}))
    return path


class TrunkAlone:
    """The extractor alone on ``TRUNK_SAMPLE`` planned tiles spread evenly over the slide, read into memory once:
    the trunk's speed depends on the tiles (the first 256 ran at 7.2-7.8 tiles/s, 768 from the middle at 11.1,
    minutes apart on one machine), so the sample must be the mix the commands see."""

    def __init__(self, site: Path, slide: Path, device: str) -> None:
        config = load_site_config(site)
        plan = plan_slide(slide, config.tiling, None)
        coords = plan.grid.coords
        reader = SlideTiles(slide, coords[::max(1, len(coords) // TRUNK_SAMPLE)][:TRUNK_SAMPLE], plan.read)
        self.tiles = [reader[i] for i in range(len(reader))]
        where = resolve_device(device)
        self.encoder = load_encoder(config.features.backbone_weights, device=where)
        self.batch = trunk_batch_size("auto", where, TILE)
        self._windows = max(1, len(self.tiles) // SAMPLE_TILES)
        self._next = 0

    def _seconds(self, tiles: list) -> float:
        """One batch untimed first: the first batch after the trunk sat idle for a minute is slower (its
        threads and caches are cold), and in a window of four batches that alone would lower the baseline."""
        extract_features(self.encoder, tiles[:self.batch], self.batch, 0)
        start = time.perf_counter()
        extract_features(self.encoder, tiles, self.batch, 0)
        return time.perf_counter() - start

    def whole_sample(self) -> float:
        """Tiles per second on the whole sample."""
        return len(self.tiles) / self._seconds(self.tiles)

    def next_window(self) -> tuple[int, float]:
        """The next window of the sample, cycling: tiles and seconds. Window k holds every
        ``len(sample) // SAMPLE_TILES``-th tile from the k-th, so each one spans the slide like the command."""
        window = self.tiles[self._next::self._windows][:SAMPLE_TILES]
        self._next = (self._next + 1) % self._windows
        return len(window), self._seconds(window)


@dataclass
class Measured:
    """A command's run: wall time without the pauses, peak memory of its tree, and the trunk alone during it."""

    seconds: float
    peak_rss: int
    peak_pss: int
    alone: list[tuple[int, float]]  # (tiles, seconds) of each pause

    def alone_tiles_per_s(self) -> float:
        return sum(tiles for tiles, _ in self.alone) / sum(seconds for _, seconds in self.alone)


def _measured(command: list[str], trunk: TrunkAlone, every_s: float) -> Measured:
    """Run ``command``, stopping its process tree every ``every_s`` seconds of its own time to run the trunk
    alone on the next window of the sample (at least once, at the end of its first period or once it is done).
    Whatever ends the benchmark early (an error, Ctrl-C, SIGTERM) stops the command's tree too."""
    alone: list[tuple[int, float]] = []
    paused_s = 0.0
    with tempfile.TemporaryFile("w+") as errors, stop_signals():
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, text=True)
        try:
            with PeakMemory(process.pid, pss=True) as memory:
                next_pause = start + every_s
                while process.poll() is None:
                    if time.perf_counter() - start - paused_s > TIME_LIMIT_S:
                        raise RuntimeError(f"{' '.join(command)} ran for more than {TIME_LIMIT_S / 3600:g} hours")
                    if time.perf_counter() >= next_pause:
                        stopped_at = time.perf_counter()
                        with memory.held(), paused(process.pid):
                            alone.append(trunk.next_window())
                        paused_s += time.perf_counter() - stopped_at
                        next_pause = time.perf_counter() + every_s
                    time.sleep(0.1)
        except BaseException:
            stop_pid(process.pid)
            raise
        seconds = time.perf_counter() - start - paused_s
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {errors.read()[-2000:]}")
    if not alone:  # a command shorter than one period: the trunk alone right after it
        alone.append(trunk.next_window())
    return Measured(seconds, memory.peak, memory.peak_pss, alone)


def _rates(measured: Measured) -> list[float]:
    """Tiles per second of each pause's window, for the record."""
    return [round(tiles / seconds, 2) for tiles, seconds in measured.alone]


def run(quick: bool, device: str = "cpu") -> dict:
    """Args: quick: a 16,000 x 12,000 slide; device: ``features.device`` of the site."""
    width, height = QUICK_SIZE if quick else FULL_SIZE
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        slide = root / "slides" / "slide-1.tif"
        start = time.perf_counter()
        make_slide(slide, LABELS[1], SlideSpec(width=width, height=height, mpp=MPP), Stain(),
                   np.random.default_rng(1))
        make_seconds = time.perf_counter() - start
        site = _site_yaml(root / "site", slide, root / "cache", device)
        trunk = TrunkAlone(site, slide, device)
        every_s = SAMPLE_EVERY_S[quick]
        bracket = [trunk.whole_sample()]
        prepare = _measured([str(bin_dir / "fedpath-site"), "prepare", "--config", str(site), "--no-progress"],
                            trunk, every_s)
        bracket.append(trunk.whole_sample())
        index = FeatureCache(root / "cache").read_index()
        tiles = sum(item["tiles"] for item in index.items.values())

        torch.manual_seed(0)
        model = ModelConfig()
        save_checkpoint(root / "run", 1, model_arrays(build_head(model, len(LABELS))),
                        {"model": model.as_dict(), "classes": list(LABELS), "sequence_length": 8}, best=False)
        predict_site = _site_yaml(root / "predict-site", slide, root / "empty-cache", device)
        checkpoint = root / "run" / "checkpoints" / "latest.npz"
        predict = _measured([str(bin_dir / "fedpath-site"), "predict", str(slide), "--model", str(checkpoint),
                             "--out", str(root / "out"), "--config", str(predict_site), "--no-progress"],
                            trunk, every_s)
        bracket.append(trunk.whole_sample())
        slide_gb = slide.stat().st_size / 1e9
    prepare_rate, predict_rate = tiles / prepare.seconds, tiles / predict.seconds
    alone, predict_alone = prepare.alone_tiles_per_s(), predict.alone_tiles_per_s()
    peak = max(prepare.peak_rss, predict.peak_rss)
    return {"device": device, "slide_px": [width, height], "mpp": MPP, "target_mpp": TARGET_MPP, "tile_size": TILE,
            "slide_file_gb": round(slide_gb, 2), "make_slide_seconds": round(make_seconds, 1),
            "readers": READERS, "batch_size": trunk.batch, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "tiles": tiles, "prepare_seconds": round(prepare.seconds, 1), "prepare_tiles_per_s": round(prepare_rate, 2),
            "prepare_peak_rss_gb": round(prepare.peak_rss / 1e9, 3),
            "prepare_peak_pss_gb": round(prepare.peak_pss / 1e9, 3),
            "predict_seconds": round(predict.seconds, 1), "predict_tiles_per_s": round(predict_rate, 2),
            "predict_peak_rss_gb": round(predict.peak_rss / 1e9, 3),
            "predict_peak_pss_gb": round(predict.peak_pss / 1e9, 3),
            "peak_rss_gb": round(peak / 1e9, 3),
            "trunk_sample": TRUNK_SAMPLE, "sample_tiles": SAMPLE_TILES, "sample_every_s": every_s,
            "trunk_alone_tiles_per_s": round(alone, 2), "trunk_alone_samples": _rates(prepare),
            "predict_trunk_alone_tiles_per_s": round(predict_alone, 2),
            "predict_trunk_alone_samples": _rates(predict),
            "overlap_ratio": round(prepare_rate / alone, 3),
            "predict_overlap_ratio": round(predict_rate / predict_alone, 3),
            "bracketed_trunk_alone": [round(rate, 2) for rate in bracket],
            "bracketed_overlap_ratio": round(prepare_rate / ((bracket[0] + bracket[1]) / 2), 3),
            "bracketed_predict_overlap_ratio": round(predict_rate / ((bracket[1] + bracket[2]) / 2), 3),
            "goal_peak_rss_gb": GOAL_PEAK_RSS_GB, "goal_overlap_ratio": GOAL_OVERLAP,
            "goal_met": peak / 1e9 <= GOAL_PEAK_RSS_GB and prepare_rate / alone >= GOAL_OVERLAP,
            "rss": "sum of the process tree's resident memory, sampled every 0.5 s (shared pages counted per process)"}
