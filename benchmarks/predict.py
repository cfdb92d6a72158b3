"""Slides per minute of `fedpath-site predict`, end to end, and where the time goes.

Generated slides of one fixed size go through the product's ``predict`` with the default tiling
(299-px tiles at 0.5 µm/px) and an empty feature cache, so every tile is read and run through the
trunk: the case of a new slide. ``read_s`` is opening, hashing, the tissue mask, the grid and
decoding tiles (one process: ``num_workers: 0`` keeps the split exact); ``features_s`` the
InceptionV3 trunk; ``head_s`` classification and the Shapley importance of every tile;
``geojson_s`` building and writing NAME.geojson, the tiles as QuPath objects, and ``geojson_share``
its share of the whole prediction's wall time (goal <= 0.05: the export must not slow prediction
noticeably). The head is the default variant (RNN, 128/128, windows of 8) with untrained
weights: its cost does not depend on what it learned. ``--device cuda`` runs the trunk on a GPU
(``features.device``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from client.predict import predict
from client.site_config import load_site_config
from shared.checkpoints import save_checkpoint
from shared.devices import resolve_device
from shared.model import ModelConfig, build_head
from shared.parameters import model_arrays
from simulations.slide_generator import LABELS, SlideSpec, Stain, make_slide

LENGTH = 8
GOAL_GEOJSON_SHARE = 0.05


def run(quick: bool, device: str = "cpu") -> dict:
    """Args: quick: two small slides; device: ``features.device`` of the predicting site."""
    slides, size = (2, 2048) if quick else (6, 4096)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(slides):
            make_slide(root / "slides" / f"slide-{i}.tif", LABELS[i % 2], SlideSpec(size, size), Stain(),
                       np.random.default_rng(i))
        (root / "site.yaml").write_text(yaml.safe_dump({
            "name": "bench", "data": {"manifest": "manifest.csv"},
            "features": {"batch_size": 32, "num_workers": 0, "cache_dir": str(root / "empty-cache"),
                         "device": device}}))
        torch.manual_seed(0)
        config = ModelConfig()
        save_checkpoint(root / "run", 1, model_arrays(build_head(config, len(LABELS))),
                        {"model": config.as_dict(), "classes": list(LABELS), "sequence_length": LENGTH}, best=False)
        start = time.perf_counter()
        result = predict(root / "run" / "checkpoints" / "latest.npz", [root / "slides"], root / "out",
                         site=load_site_config(root / "site.yaml"), progress=False)
        seconds = time.perf_counter() - start
    assert result.failed == 0, result.report()
    split = {key: sum(r.timing[key] for r in result.results) for key in ("read_s", "features_s", "head_s", "geojson_s")}
    share = split["geojson_s"] / seconds
    split = {key: round(value, 4 if key == "geojson_s" else 2) for key, value in split.items()}
    tiles = sum(r.tiles for r in result.results)
    return {"device": str(resolve_device(device)), "slides": slides, "slide_px": size, "tile_size": 299,
            "target_mpp": 0.5, "tiles": tiles,
            "threads": torch.get_num_threads(), "seconds": round(seconds, 2),
            "slides_per_min": round(60 * slides / seconds, 2), "tiles_per_s": round(tiles / seconds, 2), **split,
            "other_s": round(seconds - sum(split.values()), 2), "geojson_share": round(share, 5),
            "goal_geojson_share": GOAL_GEOJSON_SHARE, "goal_met": share <= GOAL_GEOJSON_SHARE}
