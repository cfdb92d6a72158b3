"""Feature extraction throughput, and what the cache saves on a second `prepare`.

``speedup``: fedpath's extractor (batched, channels-last, inference mode) against a plain
torchvision InceptionV3 eager forward at batch 1, both on the same in-memory 299-px tiles so only
the compute differs. ``cache_rerun_speedup``: a second `prepare` of the same generated site
against the first.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from client.features import extract_features, load_encoder
from client.prepare import prepare_site
from client.site_config import load_site_config
from shared.encoder import TileEncoder
from simulations.consortium import make_consortium


def _eager_batch1(encoder: TileEncoder, tiles: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for tile in tiles:
            encoder.trunk(encoder.normalize(tile.permute(2, 0, 1)[None].contiguous()))
    return len(tiles) / (time.perf_counter() - start)


def _fedpath(encoder: TileEncoder, tiles: torch.Tensor, batch_size: int) -> float:
    start = time.perf_counter()
    extract_features(encoder, list(tiles.numpy()), batch_size=batch_size, num_workers=0)
    return len(tiles) / (time.perf_counter() - start)


def _cache_rerun(folder: Path, slides: int) -> dict:
    config = load_site_config(make_consortium(folder, 1, slides, seed=1, size=2048, tile_size=299, progress=False)[0])
    first = prepare_site(config, progress=False)
    second = prepare_site(config, progress=False)
    assert second.new_tiles == 0, "second prepare recomputed tiles"
    return {"cache_tiles": first.tiles, "first_prepare_s": round(first.seconds, 2),
            "second_prepare_s": round(second.seconds, 3),
            "cache_rerun_speedup": round(first.seconds / second.seconds, 1)}


def run(quick: bool) -> dict:
    n_tiles, batch_size, slides = (32, 16, 3) if quick else (96, 32, 8)
    generator = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (n_tiles, 299, 299, 3), dtype=torch.uint8, generator=generator)  # as read
    plain = TileEncoder("random").eval()  # the torchvision default layout: contiguous NCHW
    tuned = load_encoder("random")
    _eager_batch1(plain, tiles[:2])  # warm-up both paths
    _fedpath(tuned, tiles[:batch_size], batch_size)
    baseline = _eager_batch1(plain, tiles)
    ours = _fedpath(tuned, tiles, batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        cache = _cache_rerun(Path(tmp), slides)
    return {"tile_size": 299, "tiles": n_tiles, "batch_size": batch_size, "threads": torch.get_num_threads(),
            "eager_batch1_tiles_per_s": round(baseline, 2), "fedpath_tiles_per_s": round(ours, 2),
            "speedup": round(ours / baseline, 3), **cache}
