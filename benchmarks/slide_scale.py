"""A scanner-size slide through `prepare` and `predict`: memory that does not grow with the slide, and
reading that keeps up with the trunk.

One generated 80,000 x 60,000 px slide at 0.25 µm/px (40x; streamed to disk tile by tile,
``simulations/large_slide.py``) is tiled at 0.5 µm/px into 299-px tiles by the product's own
commands, each run as a hospital runs it, in a process of its own: ``fedpath-site prepare`` (an empty
cache: every tile read, through the trunk, cached) and ``fedpath-site predict`` (another empty cache:
every tile again, plus the head and each tile's importance). Reader processes (``features.num_workers``,
``client/tile_reader.py``) decode tiles while the trunk runs, each at most one batch ahead of it.

Figures:

- ``tiles``, ``*_seconds`` (wall time of the command, start-up included) and ``*_tiles_per_s``;
- ``*_peak_rss_gb``: the largest sum of the resident memory of the command's process tree (it and its
  reader processes), sampled every 0.5 s from /proc. Pages a reader shares with its parent (torch's
  libraries) count twice, so this is an upper bound; ``*_peak_pss_gb`` counts each shared page once
  (proportional set size), what the tree really holds. Goal: ``peak_rss_gb`` ≤ 2 GB whatever the
  slide's size;
- ``trunk_alone_tiles_per_s``: the same extractor on ``TRUNK_SAMPLE`` of the same tiles (spread over the
  slide), read into
  memory first, with no reader beside it, at the same batch size, in this run: the mean of the
  measurements just before and just after ``prepare`` (``trunk_alone_around_prepare``; the machine's speed
  drifts, so the baseline brackets the command it is compared with);
- ``overlap_ratio``: ``prepare_tiles_per_s`` / ``trunk_alone_tiles_per_s``. 1 means reading and
  everything else `prepare` does costs nothing beside the trunk. Goal: ≥ 0.9;
- ``predict_overlap_ratio``: the same for ``predict`` against the measurements around it
  (``trunk_alone_around_predict``); a lower bound, as predict also explains every tile and draws.

``--quick`` makes a 16,000 x 12,000 slide instead (about 250 tiles). ``--device`` runs the trunk there
(``features.device``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
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
from simulations.process_tree import PeakMemory
from simulations.slide_generator import LABELS, SlideSpec, Stain, make_slide

FULL_SIZE, QUICK_SIZE = (80_000, 60_000), (16_000, 12_000)
MPP, TARGET_MPP, TILE = 0.25, 0.5, 299
TRUNK_SAMPLE = 256  # tiles the trunk runs alone on (about 25 s on 2 CPU cores)
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


def _measured(command: list[str]) -> tuple[float, int, int]:
    """Run ``command``; its wall time and the peaks of its process tree's summed RSS and PSS (bytes)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakMemory(process.pid, pss=True) as memory:
        _, errors = process.communicate(timeout=4 * 3600)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {errors[-2000:]}")
    return time.perf_counter() - start, memory.peak, memory.peak_pss


def _trunk_alone(site: Path, slide: Path, device: str) -> tuple[float, int]:
    """Tiles per second of the extractor alone on ``TRUNK_SAMPLE`` planned tiles spread evenly over the slide:
    the trunk's speed depends on the tiles (the first 256 ran at 7.2-7.8 tiles/s, 768 from the middle at 11.1,
    minutes apart on one machine), so the sample must be the mix prepare sees."""
    config = load_site_config(site)
    plan = plan_slide(slide, config.tiling, None)
    coords = plan.grid.coords
    reader = SlideTiles(slide, coords[::max(1, len(coords) // TRUNK_SAMPLE)][:TRUNK_SAMPLE], plan.read)
    tiles = [reader[i] for i in range(len(reader))]
    where = resolve_device(device)
    encoder = load_encoder(config.features.backbone_weights, device=where)
    batch = trunk_batch_size("auto", where, TILE)
    extract_features(encoder, tiles[:batch], batch, 0)  # warm-up
    start = time.perf_counter()
    extract_features(encoder, tiles, batch, 0)
    return len(tiles) / (time.perf_counter() - start), batch


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
        # The trunk alone before, between and after the commands; each command is compared with the mean of the
        # two around it: this VM's speed drifts (7.2 and 11.1 tiles/s an hour apart), and a ratio of rates
        # measured 20 minutes apart must not read that as overlap.
        alone_before, _ = _trunk_alone(site, slide, device)
        prepare_s, prepare_peak, prepare_pss = _measured([str(bin_dir / "fedpath-site"), "prepare", "--config",
                                                          str(site), "--no-progress"])
        alone_between, _ = _trunk_alone(site, slide, device)
        index = FeatureCache(root / "cache").read_index()
        tiles = sum(item["tiles"] for item in index.items.values())

        torch.manual_seed(0)
        model = ModelConfig()
        save_checkpoint(root / "run", 1, model_arrays(build_head(model, len(LABELS))),
                        {"model": model.as_dict(), "classes": list(LABELS), "sequence_length": 8}, best=False)
        predict_site = _site_yaml(root / "predict-site", slide, root / "empty-cache", device)
        checkpoint = root / "run" / "checkpoints" / "latest.npz"
        predict_s, predict_peak, predict_pss = _measured([str(bin_dir / "fedpath-site"), "predict", str(slide),
                                                          "--model", str(checkpoint), "--out", str(root / "out"),
                                                          "--config", str(predict_site), "--no-progress"])
        alone_after, batch = _trunk_alone(site, slide, device)
        alone = (alone_before + alone_between) / 2
        slide_gb = slide.stat().st_size / 1e9
    prepare_rate = tiles / prepare_s
    return {"device": device, "slide_px": [width, height], "mpp": MPP, "target_mpp": TARGET_MPP, "tile_size": TILE,
            "slide_file_gb": round(slide_gb, 2), "make_slide_seconds": round(make_seconds, 1),
            "readers": READERS, "batch_size": batch, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "tiles": tiles, "prepare_seconds": round(prepare_s, 1), "prepare_tiles_per_s": round(prepare_rate, 2),
            "prepare_peak_rss_gb": round(prepare_peak / 1e9, 3), "prepare_peak_pss_gb": round(prepare_pss / 1e9, 3),
            "predict_seconds": round(predict_s, 1), "predict_tiles_per_s": round(tiles / predict_s, 2),
            "predict_peak_rss_gb": round(predict_peak / 1e9, 3), "predict_peak_pss_gb": round(predict_pss / 1e9, 3),
            "peak_rss_gb": round(max(prepare_peak, predict_peak) / 1e9, 3),
            "trunk_sample": TRUNK_SAMPLE, "trunk_alone_tiles_per_s": round(alone, 2),
            "trunk_alone_around_prepare": [round(alone_before, 2), round(alone_between, 2)],
            "trunk_alone_around_predict": [round(alone_between, 2), round(alone_after, 2)],
            "overlap_ratio": round(prepare_rate / alone, 3),
            "predict_overlap_ratio": round(tiles / predict_s / ((alone_between + alone_after) / 2), 3),
            "goal_peak_rss_gb": GOAL_PEAK_RSS_GB, "goal_overlap_ratio": GOAL_OVERLAP,
            "goal_met": (max(prepare_peak, predict_peak) / 1e9 <= GOAL_PEAK_RSS_GB
                         and prepare_rate / alone >= GOAL_OVERLAP),
            "rss": "sum of the process tree's resident memory, sampled every 0.5 s (shared pages counted per process)"}
