"""Shared fixtures: small generated slides for every test run, the handout's real slides when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

# Two threads like CI; the suite must not fight itself for cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))

HANDOUT = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_SLIDES = HANDOUT / "slides"
CRC_TILES = HANDOUT / "crc-tiles"

requires_real_slides = pytest.mark.skipif(
    not REAL_SLIDES.is_dir(), reason=f"real slides are handout data, absent here ({REAL_SLIDES})")
requires_crc_tiles = pytest.mark.skipif(
    not CRC_TILES.is_dir(), reason=f"real colorectal tiles are handout data, absent here ({CRC_TILES})")

# Small tiles at 1 µm/px keep InceptionV3 cheap: a 1024-px slide is a 5 x 5 grid of 96-px tiles.
FAST_TILING = {"target_mpp": 1.0, "tile_size": 96, "min_tissue": 0.4, "mask_size": 256}


@pytest.fixture(scope="session")
def generated_manifests(tmp_path_factory) -> list[Path]:
    from simulations.slide_generator import SlideSpec, make_site_slides

    out = tmp_path_factory.mktemp("generated")
    return make_site_slides(out, sites=2, slides_per_site=4, seed=7, spec=SlideSpec(width=1024, height=1024))


def write_site_yaml(folder: Path, data: dict, **sections) -> Path:
    """A site.yaml in ``folder`` with fast tiling unless ``tiling`` is given."""
    config = {"name": folder.name, "data": data, "tiling": dict(FAST_TILING),
              "features": {"batch_size": 16, "num_workers": 0, "cache_dir": str(folder / "cache")}}
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
