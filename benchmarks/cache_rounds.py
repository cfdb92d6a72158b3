"""A site's time per federated round with its feature cache, against recomputing tile features
every round (reading the slides, tiling, the InceptionV3 trunk) before the same training.

Both arms call the product's code: ``federated_round.fit`` on the prepared cache, and
``prepare_site`` into an empty cache followed by the same ``fit``. The ratio grows with the
number of tiles per slide: the generated slides here are small (4096 px, about 80 tiles of
299 px at 0.5 µm/px each; a real 20x slide has thousands), so the figure is a lower bound.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from client import federated_round
from client.prepare import prepare_site
from client.site_config import load_site_config
from server.app import initial_model, round_plan
from server.server_config import ServerConfig
from shared.round_plan import PrivacyTarget
from simulations.consortium import make_consortium


def run(quick: bool) -> dict:
    slides, rounds, size = (4, 2, 2048) if quick else (6, 3, 4096)
    server = ServerConfig(classes=("adenoma", "adenocarcinoma"), privacy=PrivacyTarget(epsilon=8.0))
    server = replace(server, federation=replace(server.federation, rounds=2 * rounds),
                     training=replace(server.training, epochs=1, batch_size=2))
    arrays = list(initial_model(server).values())
    with tempfile.TemporaryDirectory() as tmp:
        site = load_site_config(make_consortium(Path(tmp), 1, slides, seed=5, size=size, tile_size=299,
                                                progress=False)[0])
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
    cached_s, recomputed_s = statistics.median(cached), statistics.median(recomputed)
    return {"slides": slides, "slide_px": size, "tiles": prepared.tiles, "tile_size": 299, "rounds": rounds,
            "threads": torch.get_num_threads(), "cached_round_s": round(cached_s, 3),
            "recompute_round_s": round(recomputed_s, 2), "speedup": round(recomputed_s / cached_s, 1)}
