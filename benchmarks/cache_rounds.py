"""A site's time per federated round with its feature cache, against recomputing tile features
every round (reading the slides, tiling, the InceptionV3 trunk) before the same training.

Both arms call the product's code: ``federated_round.fit`` on the prepared cache, and
``prepare_site`` into an empty cache followed by the same ``fit``. The ratio grows with the
number of tiles per slide: the generated slides here are small (4096 px, about 80 tiles of
299 px at 0.5 µm/px each; a real 20x slide has thousands), so the figure is a lower bound.

A third arm is the warm site worker (``client/task_runner.py``): the same cached round in a process
that keeps the cache's entries between rounds, and on a GPU the training vectors on the device
(``--device``); against it, the same rounds with that memory emptied before each (what a new process
per message would read). Rounds of the two arms alternate, so a drifting machine touches both alike.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from client import feature_cache, federated_round, sequence_data
from client.prepare import prepare_site
from client.site_config import load_site_config
from client.task_runner import WARM_CACHE_BYTES, WARM_DEVICE_SHARE
from server.app import initial_model, round_plan
from server.server_config import ServerConfig
from shared.round_plan import PrivacyTarget
from simulations.consortium import make_consortium


def run(quick: bool, device: str = "cpu") -> dict:
    slides, rounds, size = (4, 2, 2048) if quick else (6, 3, 4096)
    server = ServerConfig(classes=("adenoma", "adenocarcinoma"), privacy=PrivacyTarget(epsilon=8.0))
    server = replace(server, federation=replace(server.federation, rounds=4 * rounds + 1),
                     training=replace(server.training, epochs=1, batch_size=2))
    arrays = list(initial_model(server).values())
    with tempfile.TemporaryDirectory() as tmp:
        site = load_site_config(make_consortium(Path(tmp), 1, slides, seed=5, size=size, tile_size=299,
                                                progress=False)[0])
        site = replace(site, features=replace(site.features, device=device))
        prepared = prepare_site(site, progress=False)
        cached, recomputed = [], []
        for index in range(rounds):
            start = time.perf_counter()
            federated_round.fit(site, round_plan(server, "bench", 2 * index + 1), arrays)
            cached.append(time.perf_counter() - start)
            fresh = replace(site, features=replace(site.features, cache_dir=Path(tmp) / f"recompute-{index}"))
            start = time.perf_counter()
            prepare_site(fresh, progress=False)
            federated_round.fit(fresh, round_plan(server, "bench", 2 * index + 2), arrays)
            recomputed.append(time.perf_counter() - start)
        warm, cold = warm_rounds(site, server, arrays, rounds, first_round=2 * rounds + 1)
    cached_s, recomputed_s = statistics.median(cached), statistics.median(recomputed)
    warm_s, cold_s = statistics.median(warm), statistics.median(cold)
    return {"slides": slides, "slide_px": size, "tiles": prepared.tiles, "tile_size": 299, "rounds": rounds,
            "threads": torch.get_num_threads(), "device": device, "cached_round_s": round(cached_s, 3),
            "recompute_round_s": round(recomputed_s, 2), "speedup": round(recomputed_s / cached_s, 1),
            "warm_round_s": round(warm_s, 3), "cold_round_s": round(cold_s, 3),
            "warm_speedup": round(cold_s / warm_s, 2)}


def warm_rounds(site, server, arrays, rounds: int, first_round: int) -> tuple[list[float], list[float]]:
    """Seconds of cached rounds in a warm process (memory kept) and with that memory emptied, alternating."""
    memos = (feature_cache.WARM_ENTRIES, sequence_data.DEVICE_ENTRIES)
    saved = (feature_cache.WARM_ENTRIES.max_bytes, feature_cache.WARM_DEVICE_SHARE)
    feature_cache.WARM_ENTRIES.max_bytes, feature_cache.WARM_DEVICE_SHARE = WARM_CACHE_BYTES, WARM_DEVICE_SHARE
    try:
        federated_round.fit(site, round_plan(server, "bench", first_round), arrays)  # fills the memory
        warm, cold = [], []
        for index in range(rounds):
            for arm, times in (("warm", warm), ("cold", cold)):
                if arm == "cold":
                    for memo in memos:
                        memo.clear()
                start = time.perf_counter()
                federated_round.fit(site, round_plan(server, "bench", first_round + 1 + 2 * index
                                                     + (arm == "cold")), arrays)
                times.append(time.perf_counter() - start)
        return warm, cold
    finally:
        feature_cache.WARM_ENTRIES.max_bytes, feature_cache.WARM_DEVICE_SHARE = saved
        sequence_data.DEVICE_ENTRIES.max_bytes = 0
        for memo in memos:
            memo.clear()
