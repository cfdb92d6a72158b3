import numpy as np
import pytest

from client.tiling import hilbert_index, spatial_order, tile_grid, tissue_fractions
from client.tissue import otsu_threshold, saturation, tissue_mask


def test_otsu_splits_two_populations():
    values = np.concatenate([np.full(500, 10), np.full(300, 200)]).astype(np.uint8)
    assert 10 <= otsu_threshold(values) < 200


def test_tissue_mask_finds_pink_on_white():
    image = np.full((100, 100, 3), 242, dtype=np.uint8)
    image[20:60, 30:80] = (200, 110, 170)  # eosin pink
    image[70:75, 10:15] = (30, 30, 30)  # black ink speck: not tissue
    mask = tissue_mask(image)
    assert mask[20:60, 30:80].all()
    assert mask.sum() == 40 * 50


def test_blank_slide_has_no_tissue():
    rng = np.random.default_rng(0)
    blank = (240 + rng.integers(-3, 4, size=(64, 64, 3))).astype(np.uint8)
    assert not tissue_mask(blank).any()


def test_saturation_of_grey_is_zero():
    assert (saturation(np.full((4, 4, 3), 128, dtype=np.uint8)) == 0).all()


def test_tissue_fractions_match_brute_force():
    rng = np.random.default_rng(1)
    mask = rng.random((60, 90)) > 0.6
    scale = (4.0, 4.0)  # one mask pixel is 4 level-0 pixels
    fractions = tissue_fractions(mask, scale, footprint=40, columns=9, rows=6)
    for r in range(6):
        for c in range(9):
            assert fractions[r, c] == pytest.approx(mask[r * 10:(r + 1) * 10, c * 10:(c + 1) * 10].mean())


def test_tile_grid_keeps_tissue_tiles_only():
    mask = np.zeros((100, 100), dtype=bool)
    mask[0:50, 0:50] = True  # top-left quarter
    grid = tile_grid(mask, (10.0, 10.0), dimensions=(1000, 1000), footprint=250, min_tissue=0.5)
    assert sorted(map(tuple, grid.cells)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert sorted(map(tuple, grid.coords)) == [(0, 0), (0, 250), (250, 0), (250, 250)]
    assert np.all(grid.tissue == 1.0)


def test_partial_tiles_at_the_edge_are_dropped():
    mask = np.ones((10, 10), dtype=bool)
    grid = tile_grid(mask, (10.0, 10.0), dimensions=(100, 100), footprint=30, min_tissue=0.1)
    assert len(grid) == 9  # 3 x 3 whole tiles; the 10-px remainder is not a tile


def test_hilbert_order_walks_to_neighbours():
    ys, xs = np.mgrid[0:8, 0:8]
    cells = np.stack([xs.ravel(), ys.ravel()], axis=1)
    ordered = cells[spatial_order(cells)]
    steps = np.abs(np.diff(ordered, axis=0)).sum(axis=1)
    assert (steps == 1).all()  # every next tile touches the previous one
    assert sorted(hilbert_index(xs.ravel(), ys.ravel(), 3)) == list(range(64))


def test_spatial_order_of_nothing():
    assert spatial_order(np.zeros((0, 2), dtype=np.int64)).shape == (0,)
