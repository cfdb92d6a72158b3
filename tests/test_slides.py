import numpy as np
import openslide
import pytest

from client.slides import SlideError, base_mpp, open_slide, plan_for_slide, plan_read, read_tile, thumbnail
from tests.conftest import REAL_SLIDES, requires_real_slides

MPP = openslide.PROPERTY_NAME_MPP_X
POWER = openslide.PROPERTY_NAME_OBJECTIVE_POWER


def test_base_mpp_prefers_recorded_mpp_then_objective_then_override():
    assert base_mpp({MPP: "0.25", POWER: "20"}) == (0.25, "mpp")
    assert base_mpp({POWER: "40"}) == (0.25, "objective-power")
    assert base_mpp({}, override=0.5) == (0.5, "override")
    with pytest.raises(ValueError, match="mpp_override"):
        base_mpp({MPP: "nonsense"})


@pytest.mark.parametrize("mpp, target, downsamples, level, read_size, footprint", [
    (0.25, 0.5, [1, 4, 16], 0, 598, 598),  # 40x slide, 20x target: level 0, read twice the pixels
    (0.25, 1.0, [1, 4, 16], 1, 299, 1196),  # exactly level 1
    (0.25, 2.0, [1, 4, 16], 1, 598, 2392),  # between levels: the finer one
    (0.5, 0.5, [1, 2.0001, 4], 0, 299, 299),
    (0.5, 1.0, [1, 2.0001, 4], 1, 299, 598),  # a downsample a hair above 2 still counts as 2
    (1.0, 0.5, [1, 4], 0, 150, 150),  # slide coarser than the target: upsampled from level 0
])
def test_plan_read_chooses_level(mpp, target, downsamples, level, read_size, footprint):
    plan = plan_read(downsamples, mpp, target, 299)
    assert (plan.level, plan.read_size, plan.footprint) == (level, read_size, footprint)


def test_missing_and_non_slide_files(tmp_path):
    with pytest.raises(SlideError, match="file not found"):
        open_slide(tmp_path / "none.svs")
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide" * 100)
    with pytest.raises(SlideError, match="not a whole-slide image"):
        open_slide(junk)


def test_generated_slide_reads_at_target(generated_manifests):
    path = generated_manifests[0].parent / "slides" / "slide-001.tif"
    slide = open_slide(path)
    assert slide.level_count >= 2
    plan = plan_for_slide(slide, target_mpp=1.0, tile_size=96)
    assert plan.mpp_source == "mpp" and plan.level == 1 and plan.read_size == 96
    tile = read_tile(slide, 0, 0, plan)
    assert tile.shape == (96, 96, 3) and tile.dtype == np.uint8
    thumb, scale = thumbnail(slide, 256)
    assert max(thumb.shape[:2]) <= 256
    assert scale[0] == pytest.approx(slide.dimensions[0] / thumb.shape[1])


def test_area_outside_the_scan_is_white(generated_manifests):
    slide = open_slide(generated_manifests[0].parent / "slides" / "slide-001.tif")
    plan = plan_for_slide(slide, target_mpp=0.5, tile_size=96)
    width, height = slide.dimensions
    tile = read_tile(slide, width - 10, height - 10, plan)
    assert (tile[20:, 20:] == 255).all()


@requires_real_slides
def test_real_svs_with_mpp():
    slide = open_slide(REAL_SLIDES / "cmu-1-small-region.svs")
    plan = plan_for_slide(slide, target_mpp=0.5, tile_size=299)
    assert plan.mpp_source == "mpp" and plan.base_mpp == pytest.approx(0.499, abs=1e-3)
    assert plan.level == 0 and plan.read_size == 300


@requires_real_slides
def test_real_svs_without_mpp_needs_override():
    slide = open_slide(REAL_SLIDES / "tcga-cr-7395-01a-01-ts1.svs")
    with pytest.raises(ValueError, match="data.mpp_override"):
        plan_for_slide(slide, 0.5, 299)
    plan = plan_for_slide(slide, 1.0, 299, mpp_override=0.5)
    assert plan.mpp_source == "override" and plan.level == 1
    assert read_tile(slide, 0, 0, plan).shape == (299, 299, 3)  # JPEG 2000 tiles decode


@requires_real_slides
def test_real_broken_slide_gives_clear_error():
    with pytest.raises(SlideError) as err:
        open_slide(REAL_SLIDES / "broken.svs")
    assert "broken.svs" in str(err.value) and "not a whole-slide image" in str(err.value)
