"""Feature extraction throughput, and what the cache saves on a second `prepare`.

``speedup``: fedpath's extractor (``client.features.extract_features``: channels-last, inference mode,
autocast and pinned memory on a GPU) against torchvision's InceptionV3 run the plain way (contiguous
NCHW float input, ``torch.no_grad``, float32) at the **same batch size**, on the same device and the
same in-memory 299-px tiles: only fedpath's own optimisations differ. ``cache_rerun_speedup``: a
second `prepare` of the same generated site against the first. ``--device cuda`` runs both on a GPU
(``docs/benchmarks.md``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from client.features import extract_features, load_encoder
from client.prepare import prepare_site
from client.site_config import load_site_config
from shared.devices import resolve_device
from shared.encoder import TileEncoder
from simulations.consortium import make_consortium

REPEATS = 3
"""Passes of each extractor over the same tiles, alternating; the figures are their medians."""


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _torchvision(encoder: TileEncoder, tiles: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Tiles per second of the plain path: each batch normalised to contiguous NCHW float32, no autocast."""
    _synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in tiles.split(batch_size):
            pixels = batch.permute(0, 3, 1, 2).contiguous().to(device)
            encoder.trunk(encoder.normalize(pixels)).cpu()
    _synchronize(device)
    return len(tiles) / (time.perf_counter() - start)


def _fedpath(encoder: TileEncoder, tiles: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    extract_features(encoder, list(tiles.numpy()), batch_size=batch_size, num_workers=0)
    return len(tiles) / (time.perf_counter() - start)


def _cache_rerun(folder: Path, slides: int, device: str) -> dict:
    [site_yaml] = make_consortium(folder, 1, slides, seed=1, size=2048, tile_size=299, progress=False)
    config = load_site_config(site_yaml)
    config = replace(config, features=replace(config.features, device=device))  # the benchmark's, not the site's auto
    first = prepare_site(config, progress=False)
    second = prepare_site(config, progress=False)
    assert second.new_tiles == 0, "second prepare recomputed tiles"
    return {"cache_tiles": first.tiles, "first_prepare_s": round(first.seconds, 2),
            "second_prepare_s": round(second.seconds, 3),
            "cache_rerun_speedup": round(first.seconds / second.seconds, 1)}


def run(quick: bool, device: str = "cpu") -> dict:
    """Args: quick: fewer tiles and slides; device: where both extractors run (``features.device`` values)."""
    where = resolve_device(device)
    n_tiles, batch_size, slides = (32, 16, 3) if quick else (96, 32, 8)
    if where.type == "cuda" and not quick:
        n_tiles, batch_size = 1024, 128
    generator = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (n_tiles, 299, 299, 3), dtype=torch.uint8, generator=generator)  # as read
    plain = TileEncoder("random").eval().to(where)  # torchvision's default layout: contiguous NCHW
    tuned = load_encoder("random", device=where)
    _torchvision(plain, tiles[:batch_size], batch_size, where)  # warm-up both paths
    _fedpath(tuned, tiles[:batch_size], batch_size)
    # Alternating repetitions, compared by their medians: one pass of each, one after the other, read the
    # machine's drift as a difference (0.66 and 2.16 in two runs ten minutes apart beside other work).
    baselines, ours = [], []
    for _ in range(REPEATS):
        baselines.append(_torchvision(plain, tiles, batch_size, where))
        ours.append(_fedpath(tuned, tiles, batch_size))
    baseline, fedpath = statistics.median(baselines), statistics.median(ours)
    with tempfile.TemporaryDirectory() as tmp:
        cache = _cache_rerun(Path(tmp), slides, str(where))
    return {"device": str(where), "tile_size": 299, "tiles": n_tiles, "batch_size": batch_size,
            "threads": torch.get_num_threads(),
            "baseline": "torchvision InceptionV3, NCHW float32, no_grad, same batch",
            "repeats": REPEATS, "torchvision_tiles_per_s_each": [round(r, 2) for r in baselines],
            "fedpath_tiles_per_s_each": [round(r, 2) for r in ours],
            "torchvision_tiles_per_s": round(baseline, 2), "fedpath_tiles_per_s": round(fedpath, 2),
            "speedup": round(fedpath / baseline, 3), "speedup_each": [round(f / b, 3) for f, b in zip(ours, baselines,
                                                                                                    strict=True)],
            **cache}
