"""Stain shift: the colour changes, the geometry does not (that it reaches the vectors: test_simulation)."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.slide_generator import SlideSpec, Stain, make_slide
from simulations.stain_shift import StainShift, shift_stain, site_shift


@pytest.fixture(scope="module")
def tissue(tmp_path_factory) -> np.ndarray:
    """A generated H&E region (stroma, glands, nuclei on glass), read back as RGB."""
    import openslide

    path = tmp_path_factory.mktemp("stain") / "slide.tif"
    make_slide(path, "adenoma", SlideSpec(width=512, height=512), Stain(), np.random.default_rng(4))
    with openslide.OpenSlide(str(path)) as slide:
        return np.asarray(slide.read_region((0, 0), 0, (512, 512)).convert("RGB"))


def test_reference_stain_leaves_tiles_unchanged(tissue):
    assert np.abs(shift_stain(tissue, StainShift()).astype(int) - tissue).max() <= 1  # rounding only


def test_shift_changes_colour_but_not_shape_dtype_or_geometry(tissue):
    shift = site_shift(seed=0, site=2, strength=1.0)
    shifted = shift(tissue)
    assert shifted.shape == tissue.shape and shifted.dtype == np.uint8
    assert np.abs(shifted.astype(float) - tissue).mean() > 3  # visibly another stain
    glass = tissue.min(axis=-1) >= 235
    assert np.abs(shifted[glass].astype(int) - tissue[glass]).mean() < 2  # glass stays glass
    assert shifted[glass].min() >= 220
    # Same structures in the same places: the darkness map is shifted in level, not moved.
    before, after = tissue.mean(axis=-1), shifted.astype(float).mean(axis=-1)
    assert np.corrcoef(before.ravel(), after.ravel())[0, 1] > 0.95
    edges = lambda g: np.abs(np.diff(g, axis=1)) > 25  # noqa: E731
    assert (edges(before) == edges(after)).mean() > 0.95


def test_sites_get_their_own_reproducible_stain_and_zero_strength_is_none():
    assert site_shift(1, 1, 0.0) is None
    assert site_shift(1, 1, 0.5) == site_shift(1, 1, 0.5)
    assert site_shift(1, 1, 0.5) != site_shift(1, 2, 0.5)
    assert site_shift(1, 1, 0.5).cache_settings() != site_shift(1, 2, 0.5).cache_settings()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        shift_stain(np.zeros((4, 4, 3), dtype=np.float32), StainShift())

