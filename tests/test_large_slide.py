"""Tests for hospital-size slides: the streamed pyramid writer (simulations/pyramidal_tiff.py), the
procedural renderer (simulations/large_slide.py), and `fedpath-sim make-slides --size WxH --mpp`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from scipy import ndimage

from client.slides import thumbnail
from client.tissue import tissue_mask
from simulations import slide_generator
from simulations.cli import main, microns_per_pixel, slide_size
from simulations.large_slide import ProceduralSlide, tissue_layout
from simulations.pyramidal_tiff import level_sizes, write_pyramid_tiff, write_pyramid_tiff_tiles
from simulations.slide_generator import SlideSpec, Stain, make_slide, site_stain

WIDTH, HEIGHT, MPP = 6000, 4000, 0.25


def rgb(slide: openslide.OpenSlide, level: int, x: int = 0, y: int = 0,
        size: tuple[int, int] | None = None) -> np.ndarray:
    """A region of a level as RGB; ``x``, ``y`` in that level's pixels."""
    scale = round(slide.level_downsamples[level])
    size = size or slide.level_dimensions[level]
    return np.asarray(slide.read_region((x * scale, y * scale), level, size))[..., :3]


def coverage(image: np.ndarray) -> float:
    return float(tissue_mask(image).mean())


def deep_inside_tissue(slide: ProceduralSlide) -> tuple[int, int]:
    """Level-0 (x, y) of the point of the slide farthest from glass."""
    level = len(level_sizes(slide.spec.width, slide.spec.height)) - 1
    width, height = level_sizes(slide.spec.width, slide.spec.height)[level]
    distance = ndimage.distance_transform_edt(tissue_mask(slide.render(level, 0, 0, width, height)))
    y, x = np.unravel_index(np.argmax(distance), distance.shape)
    return int(x) * 2**level, int(y) * 2**level


@pytest.fixture(scope="module")
def streamed(tmp_path_factory) -> Path:
    """A 6000 x 4000 adenocarcinoma at 0.25 µm/px, streamed tile by tile by worker processes."""
    path = tmp_path_factory.mktemp("streamed") / "slide.tif"
    info = make_slide(path, "adenocarcinoma", SlideSpec(WIDTH, HEIGHT, mpp=MPP), site_stain(np.random.default_rng(4)),
                      np.random.default_rng(11), streamed=True)
    assert info.levels == len(level_sizes(WIDTH, HEIGHT))
    return path


# --------------------------------------------------------------------------- the streamed TIFF


def test_streamed_slide_opens_in_openslide_with_levels_and_mpp(streamed):
    with openslide.OpenSlide(str(streamed)) as slide:
        assert slide.dimensions == (WIDTH, HEIGHT)
        assert slide.level_count == 5  # 6000, 3000, 1500, 750, 375 px wide
        assert slide.level_dimensions == tuple(level_sizes(WIDTH, HEIGHT))
        for level, downsample in enumerate(slide.level_downsamples):
            assert downsample == pytest.approx(2**level, rel=1e-3)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP, abs=1e-6)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(MPP, abs=1e-6)
        description = json.loads(slide.properties["tiff.ImageDescription"])
        assert description["label"] == "adenocarcinoma" and description["renderer"] == "tiles"
    with tifffile.TiffFile(streamed) as tiff:
        assert not tiff.is_bigtiff  # far below the 2 GB of raw pixels that needs it
        for index, page in enumerate(tiff.pages):
            assert page.is_tiled and page.tilewidth == page.tilelength == 256
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.subfiletype == (0 if index == 0 else 1)


def test_tissue_covers_a_third_to_a_half_in_fragments_on_glass(streamed):
    with openslide.OpenSlide(str(streamed)) as slide:
        lowest = rgb(slide, slide.level_count - 1)
        image, _ = thumbnail(slide, 512)  # what client/tissue.py sees when a site tiles the slide
    assert 0.3 <= coverage(lowest) <= 0.6
    assert 0.3 <= coverage(image) <= 0.6
    pieces, count = ndimage.label(tissue_mask(lowest))
    sizes = np.bincount(pieces.ravel())[1:]
    assert (sizes > 0.01 * lowest.shape[0] * lowest.shape[1]).sum() >= 2  # several fragments
    glass = lowest[~ndimage.binary_dilation(tissue_mask(lowest), iterations=3)]
    assert glass.min() > 200 and np.ptp(glass.mean(axis=0)) < 15  # bright, nearly grey glass


@pytest.mark.parametrize("seed", range(6))
def test_layouts_cover_30_to_60_percent_in_several_fragments(seed):
    spec = SlideSpec(80000, 60000, mpp=MPP)
    slide = ProceduralSlide("adenoma", spec, Stain(), np.random.default_rng(seed))
    level = len(level_sizes(spec.width, spec.height)) - 1
    width, height = level_sizes(spec.width, spec.height)[level]
    assert 0.3 <= coverage(slide.render(level, 0, 0, width, height)) <= 0.6
    assert tissue_layout(np.random.default_rng(seed), spec.width, spec.height).fragments >= 2


def test_reduced_levels_look_like_level_0_downsampled(streamed):
    with openslide.OpenSlide(str(streamed)) as slide:
        full = rgb(slide, 0, 2048, 1024, (2048, 2048)).astype(np.float64)
        for level in (1, 2, 3):
            scale = 2**level
            reduced = rgb(slide, level, 2048 // scale, 1024 // scale, (2048 // scale, 2048 // scale))
            downsampled = full.reshape(2048 // scale, scale, 2048 // scale, scale, 3).mean(axis=(1, 3))
            assert np.abs(reduced.mean(axis=(0, 1)) - downsampled.mean(axis=(0, 1))).max() < 3, level
            assert np.abs(reduced - downsampled).mean() < 10, level  # the same structures, not just colours


def test_looks_like_stained_tissue_and_the_labels_differ():
    spec = SlideSpec(20000, 15000, mpp=0.5)
    stain = site_stain(np.random.default_rng(1))
    dark = {}
    for label in ("adenoma", "adenocarcinoma"):
        slide = ProceduralSlide(label, spec, stain, np.random.default_rng(2))
        x, y = deep_inside_tissue(slide)
        region = slide.render(0, x - 512, y - 512, 1024, 1024).astype(float)
        assert (np.abs(region - stain.background).max(axis=-1) > 25).mean() > 0.6  # stained (lumens aside)
        mean = region.reshape(-1, 3).mean(axis=0)
        assert mean[1] < mean[0] and mean[1] < mean[2]  # pink-purple, not grey
        dark[label] = float((region @ [0.299, 0.587, 0.114] < 130).mean())  # nuclei
    assert dark["adenocarcinoma"] > 2 * dark["adenoma"] > 0


def test_a_region_is_a_function_of_its_position():
    """Any region of any level: a tile rendered alone equals the same pixels of a larger region."""
    slide = ProceduralSlide("adenocarcinoma", SlideSpec(8000, 6000, mpp=0.5), Stain(), np.random.default_rng(3),
                            cancer_region=(0.2, 0.2, 0.7, 0.8))
    for level in (0, 2):
        large = slide.render(level, 600 // 2**level, 500 // 2**level, 700, 600)
        small = slide.render(level, 600 // 2**level + 300, 500 // 2**level + 200, 256, 256)
        assert np.array_equal(small, large[200:456, 300:556])


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_whatever_the_workers_and_another_seed_other_bytes(tmp_path):
    def write(name: str, seed: int, workers: int) -> bytes:
        slide = ProceduralSlide("adenoma", SlideSpec(2000, 1500, mpp=0.5), Stain(), np.random.default_rng(seed))
        path = tmp_path / name
        write_pyramid_tiff_tiles(path, 2000, 1500, 0.5, slide.render, workers=workers)
        return path.read_bytes()

    first = write("a.tif", 7, workers=1)
    assert write("b.tif", 7, workers=2) == first
    assert write("c.tif", 8, workers=1) != first


def test_tiles_compressed_here_are_the_bytes_tifffile_would_write(tmp_path):
    """The streamed writer compresses tiles itself (in its workers); the bytes match tifffile's own."""
    image = np.asarray(site_stain(np.random.default_rng(0)).background, np.uint8) + np.zeros((256, 512, 3), np.uint8)
    image[40:200, 60:400] = (180, 90, 160)
    image = (image + np.random.default_rng(1).integers(0, 6, image.shape)).astype(np.uint8)
    write_pyramid_tiff(tmp_path / "array.tif", image, 0.5, description="x")
    write_pyramid_tiff_tiles(tmp_path / "tiles.tif", 512, 256, 0.5, lambda level, x, y, w, h: image[y:y + h, x:x + w],
                             description="x", workers=1)
    assert (tmp_path / "tiles.tif").read_bytes() == (tmp_path / "array.tif").read_bytes()


# --------------------------------------------------------------------------- the writer's contract


def test_bad_tiles_are_refused_and_nothing_is_left_behind(tmp_path):
    with pytest.raises(ValueError, match=r"render_tile must return a \(256, 256, 3\) uint8 array"):
        write_pyramid_tiff_tiles(tmp_path / "x.tif", 600, 400, 0.5, lambda *region: np.zeros((8, 8, 3), np.uint8),
                                 workers=1)
    with pytest.raises(ValueError, match="tile must be a positive multiple of 16"):
        write_pyramid_tiff_tiles(tmp_path / "x.tif", 600, 400, 0.5, lambda *region: None, tile=100)
    with pytest.raises(ValueError, match="mpp must be positive"):
        write_pyramid_tiff_tiles(tmp_path / "x.tif", 600, 400, 0.0, lambda *region: None)
    assert list(tmp_path.iterdir()) == []


def test_edge_tiles_are_padded_and_progress_is_reported(tmp_path):
    calls = []
    regions = []

    def render(level, x, y, w, h):
        regions.append((level, x, y, w, h))
        return np.full((h, w, 3), 200, np.uint8)

    levels = write_pyramid_tiff_tiles(tmp_path / "p.tif", 700, 300, 0.5, render, workers=1,
                                      progress=lambda done, total: calls.append((done, total)))
    assert levels == 2 and (0, 512, 256, 188, 44) in regions  # the last tile: what is left of the level
    assert calls[-1] == (len(regions), len(regions)) and [done for done, _ in calls] == list(range(1, len(regions) + 1))
    with openslide.OpenSlide(str(tmp_path / "p.tif")) as slide:
        assert slide.level_dimensions == ((700, 300), (350, 150))
        assert np.abs(rgb(slide, 0).astype(int) - 200).max() <= 2


def test_memory_does_not_grow_with_the_slide(tmp_path):
    """Peak RSS of the writing process and of its workers, small slide against one 25 times larger:
    an in-memory renderer would need 1 GB more for the large one (render_tissue: about 14 bytes per
    pixel), its level 0 alone 225 MB. The process's own peak is its VmHWM: getrusage's would include
    the forked pytest's, which Linux carries across exec."""
    script = textwrap.dedent("""
        import json, re, resource, sys
        import numpy as np
        from pathlib import Path
        from simulations.slide_generator import SlideSpec, Stain, make_slide

        if __name__ == "__main__":
            width, height = int(sys.argv[2]), int(sys.argv[3])
            make_slide(Path(sys.argv[1]), "adenoma", SlideSpec(width, height, mpp=0.25), Stain(),
                       np.random.default_rng(0), streamed=True)
            status = Path("/proc/self/status").read_text()
            print(json.dumps({"self": int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)),
                              "workers": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
    """)
    (tmp_path / "peak.py").write_text(script)

    def peak_kb(width: int, height: int) -> dict[str, int]:
        done = subprocess.run([sys.executable, str(tmp_path / "peak.py"), str(tmp_path / f"{width}.tif"),
                               str(width), str(height)], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=600)
        return json.loads(done.stdout.strip().splitlines()[-1])

    small, large = peak_kb(2000, 1500), peak_kb(10000, 7500)
    assert large["self"] - small["self"] < 100 * 1024, (small, large)
    assert large["workers"] - small["workers"] < 100 * 1024, (small, large)


# --------------------------------------------------------------------------- make-slides


@pytest.mark.parametrize("text, expected", [("2048", (2048, 2048)), ("80000x60000", (80000, 60000)),
                                            ("640X480", (640, 480)), (" 64x64 ", (64, 64))])
def test_size_is_n_or_w_x_h(text, expected):
    assert slide_size(text) == expected


@pytest.mark.parametrize("text, message", [
    ("", "is not a slide size"), ("abc", "is not a slide size"), ("80000x", "is not a slide size"),
    ("x600", "is not a slide size"), ("1x2x3", "is not a slide size"), ("-5", "is not a slide size"),
    ("12.5x100", "is not a slide size"), ("800*600", "is not a slide size"), ("100x10", "too small"),
    ("32", "too small")])
def test_bad_sizes_are_refused_with_what_is_wrong(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        slide_size(text)


@pytest.mark.parametrize("text", ["0", "-0.25", "abc", "nan", "1000"])
def test_bad_mpp_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        microns_per_pixel(text)


def test_make_slides_reports_a_bad_size_as_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["make-slides", "--out", str(tmp_path), "--size", "80000by60000"])
    assert exit_info.value.code == 2
    assert "argument --size: '80000by60000' is not a slide size: give N (square) or WxH" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_make_slides_streams_large_slides_at_the_asked_size_and_mpp(tmp_path, monkeypatch, capsys):
    # "Large" made small, so the streamed path runs in a test's time.
    monkeypatch.setattr(slide_generator, "STREAMED_ABOVE", 1000 * 1000)
    code = main(["make-slides", "--out", str(tmp_path), "--sites", "1", "--slides-per-site", "2", "--size",
                 "1200x1000", "--fixed-size", "--mpp", "0.25", "--seed", "5"])
    assert code == 0
    assert "% of" in capsys.readouterr().err  # a streamed slide reports its progress
    for name in ("slide-001.tif", "slide-002.tif"):
        with openslide.OpenSlide(str(tmp_path / "site-1" / "slides" / name)) as slide:
            assert slide.dimensions == (1200, 1000)
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
            assert json.loads(slide.properties["tiff.ImageDescription"])["renderer"] == "tiles"
    assert (tmp_path / "site-1" / "site.yaml").is_file() and (tmp_path / "site-1" / "manifest.csv").is_file()


def test_small_slides_keep_the_whole_array_renderer(tmp_path):
    slide_generator.make_site_slides(tmp_path, 1, 1, seed=2, spec=SlideSpec(512, 512))
    with tifffile.TiffFile(tmp_path / "site-1" / "slides" / "slide-001.tif") as tiff:
        assert "renderer" not in json.loads(tiff.pages[0].description)


def test_bigtiff_is_chosen_from_the_raw_size_of_the_pyramid(tmp_path, monkeypatch):
    """An 80000 x 60000 slide's pixels pass classic TIFF's 4 GB: such slides are BigTIFF. Checked on the
    writer's decision, with a renderer that costs nothing and tiles never written."""
    seen = {}
    original = tifffile.TiffWriter.__init__

    def spy(self, file, *args, **kwargs):
        seen["bigtiff"] = kwargs.get("bigtiff")
        original(self, file, *args, **kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(tifffile.TiffWriter, "__init__", spy)
    for (width, height), expected in (((80000, 60000), True), ((6000, 4000), False)):
        with pytest.raises(RuntimeError, match="stop"):
            write_pyramid_tiff_tiles(tmp_path / "big.tif", width, height, 0.25, lambda *region: None, workers=1)
        assert seen["bigtiff"] is expected
    assert list(tmp_path.iterdir()) == []
