"""simulations.public_tiles: generated labelled tiles in the layout pretrain-encoder reads, reproducible."""

import numpy as np
from PIL import Image

from server.encoder_pretraining import find_tiles
from simulations.public_tiles import MIN_TISSUE, make_public_tiles


def test_public_tiles_are_tissue_of_each_class_and_the_same_for_a_seed(tmp_path):
    make_public_tiles(tmp_path / "a", per_class=6, tile_size=96, field_px=512)
    make_public_tiles(tmp_path / "b", per_class=6, tile_size=96, field_px=512)
    classes, tiles = find_tiles(tmp_path / "a")
    assert classes == ["adenocarcinoma", "adenoma"] and len(tiles) == 12
    for path, _ in tiles:
        pixels = np.asarray(Image.open(path))
        glass = (pixels.min(axis=-1) > 215).mean()  # near-white pixels: the slide's background
        assert pixels.shape == (96, 96, 3) and glass <= 1 - MIN_TISSUE + 0.05
        assert np.array_equal(pixels, np.asarray(Image.open(tmp_path / "b" / path.relative_to(tmp_path / "a"))))
