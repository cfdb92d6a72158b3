"""Tests for the synthetic H&E slide generator (simulations/slide_generator.py)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from simulations import slide_generator as sg
from simulations.slide_generator import (
    LABELS,
    SlideSpec,
    Stain,
    make_site_slides,
    make_slide,
    render_tissue,
    site_stain,
    write_pyramid_tiff,
)

SMALL = SlideSpec(width=1024, height=1024)


# --------------------------------------------------------------------------- helpers


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are clearly stained (not glass)."""
    rgb = rgb[..., :3].astype(np.int16)
    return (rgb.max(-1) - rgb.min(-1) > 30) | (rgb.min(-1) < 190)


def dark_fraction(rgb: np.ndarray, where: np.ndarray | None = None) -> float:
    """Fraction of tissue pixels that are nuclear-dark (haematoxylin)."""
    rgb = rgb[..., :3].astype(np.float32)
    t = tissue_mask(rgb) if where is None else where & tissue_mask(rgb)
    lum = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return float((lum[t] < 130).mean()) if t.any() else 0.0


def lumen_fraction(rgb: np.ndarray, block: int = 8, reach: int = 12) -> float:
    """Area of white space enclosed by tissue (gland lumens) relative to tissue area.

    Works on ``block``-px blocks: a white block counts as lumen when there is tissue within
    ``reach`` blocks to its left, right, top and bottom (glass outside the tissue is not).
    """
    h, w = (s // block * block for s in rgb.shape[:2])
    t = tissue_mask(rgb[:h, :w]).reshape(h // block, block, w // block, block).mean((1, 3))
    tis, white = t > 0.5, t < 0.2

    def seen(a: np.ndarray, axis: int, rev: bool) -> np.ndarray:
        """True where a tissue block lies within ``reach`` blocks before (along axis)."""
        a = np.flip(a, axis) if rev else a
        c = np.cumsum(a, axis=axis)
        shifted = np.roll(c, reach, axis=axis)
        idx = [slice(None)] * 2
        idx[axis] = slice(0, reach)
        shifted[tuple(idx)] = 0
        out = (np.roll(c, 1, axis=axis) - shifted) > 0
        idx[axis] = slice(0, 1)
        out[tuple(idx)] = False
        return np.flip(out, axis) if rev else out

    enclosed = white.copy()
    for axis in (0, 1):
        for rev in (False, True):
            enclosed &= seen(tis.astype(np.int32), axis, rev)
    return float(enclosed.sum() / max(1, tis.sum()))


def read_manifest(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["slide", "label", "patient"]
        return list(reader)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def one_slide(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A 1536x1024 adenocarcinoma slide and the array it was rendered from."""
    spec = SlideSpec(width=1536, height=1024)
    path = tmp_path_factory.mktemp("one") / "slide.tif"
    make_slide(path, "adenocarcinoma", spec, Stain(), np.random.default_rng(11))
    ref = render_tissue("adenocarcinoma", spec, Stain(), np.random.default_rng(11))
    return path, ref


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("sites")
    manifests = make_site_slides(out, sites=3, slides_per_site=6, seed=3, spec=SMALL)
    return out, manifests


# --------------------------------------------------------------------------- TIFF / OpenSlide


def test_openslide_opens_pyramid(one_slide):
    path, _ = one_slide
    with openslide.OpenSlide(str(path)) as s:
        assert s.level_count >= 2
        assert s.dimensions == (1536, 1024)
        assert s.level_dimensions[0] == (1536, 1024)
        assert s.level_dimensions[1] == (768, 512)
        assert max(s.level_dimensions[-1]) <= 512
        for i, d in enumerate(s.level_downsamples):
            assert d == pytest.approx(2**i, rel=1e-3)
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5, abs=1e-6)
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5, abs=1e-6)
        meta = json.loads(s.properties["tiff.ImageDescription"])
        assert meta["label"] == "adenocarcinoma" and meta["cancer_region"] is None


def test_jpeg_tiles_and_subfiletype(one_slide):
    path, _ = one_slide
    with tifffile.TiffFile(path) as tf:
        assert len(tf.pages) >= 2
        for i, page in enumerate(tf.pages):
            assert page.is_tiled and page.tilewidth == 256 and page.tilelength == 256
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.subfiletype == (0 if i == 0 else 1)
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER


@pytest.mark.parametrize("mpp", [0.25, 1.0])
def test_other_mpp_reported(tmp_path, mpp):
    rgb = np.full((600, 700, 3), 240, dtype=np.uint8)
    path = tmp_path / "m.tif"
    write_pyramid_tiff(path, rgb, mpp)
    with openslide.OpenSlide(str(path)) as s:
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(mpp, abs=1e-6)
        assert s.level_count == 2


def test_read_region_tissue_and_background(one_slide):
    path, ref = one_slide
    t = tissue_mask(ref)
    b = 64
    h, w = (s // b * b for s in t.shape)
    frac = t[:h, :w].reshape(h // b, b, w // b, b).mean((1, 3))
    inside = np.argwhere(frac > 0.98)
    outside = np.argwhere(frac == 0.0)
    assert len(inside) and len(outside)
    with openslide.OpenSlide(str(path)) as s:
        for (by, bx), kind in ((inside[len(inside) // 2], "tissue"), (outside[0], "glass")):
            reg = np.asarray(s.read_region((int(bx * b), int(by * b)), 0, (b, b)))[..., :3]
            exp = ref[by * b : (by + 1) * b, bx * b : (bx + 1) * b]
            # JPEG q90 keeps the picture: mean absolute error of a few grey levels.
            assert np.abs(reg.astype(int) - exp.astype(int)).mean() < 8
            mean = reg.reshape(-1, 3).mean(0)
            if kind == "tissue":
                assert mean.min() < 200  # stained
                assert mean[1] < mean[0] and mean[1] < mean[2]  # pink/purple, not grey
            else:
                assert reg.min() > 215 and mean.max() - mean.min() < 12  # near-white glass


def test_tissue_coverage_reasonable():
    for seed in range(4):
        rgb = render_tissue(LABELS[seed % 2], SMALL, Stain(), np.random.default_rng(seed))
        cov = tissue_mask(rgb).mean()
        assert 0.25 < cov < 0.65, (seed, cov)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tifffile.TiffWriter, "write", boom)
    with pytest.raises(RuntimeError):
        write_pyramid_tiff(tmp_path / "x.tif", np.zeros((64, 64, 3), np.uint8), 0.5)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- determinism


def test_render_deterministic_and_seed_dependent():
    a = render_tissue("adenoma", SMALL, Stain(), np.random.default_rng(5))
    b = render_tissue("adenoma", SMALL, Stain(), np.random.default_rng(5))
    c = render_tissue("adenoma", SMALL, Stain(), np.random.default_rng(6))
    assert a.shape == (1024, 1024, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_site_slides_deterministic(tmp_path, sites):
    out, manifests = sites
    again = make_site_slides(tmp_path / "again", sites=1, slides_per_site=6, seed=3, spec=SMALL)
    make_site_slides(tmp_path / "other", sites=1, slides_per_site=6, seed=4, spec=SMALL)
    rows = read_manifest(manifests[0])
    assert read_manifest(again[0]) == rows
    for name in ("slide-001.tif", "slide-004.tif"):
        p1 = out / "site-1" / "slides" / name
        p2 = tmp_path / "again" / "site-1" / "slides" / name
        assert np.array_equal(tifffile.imread(p1), tifffile.imread(p2))
    p3 = tmp_path / "other" / "site-1" / "slides" / "slide-001.tif"
    a, b = tifffile.imread(out / "site-1" / "slides" / "slide-001.tif"), tifffile.imread(p3)
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_a_seed_gives_the_same_bytes_and_another_seed_other_bytes(tmp_path):
    spec = SlideSpec(width=512, height=512)
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        make_site_slides(tmp_path / name, sites=2, slides_per_site=2, seed=seed, spec=spec)

    def files(root: Path) -> dict[Path, bytes]:
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    first, again, other = (files(tmp_path / name) for name in "abc")
    assert len(first) == 6 and first == again  # 2 sites x (2 slides + manifest)
    assert other.keys() == first.keys()
    assert all(other[path] != first[path] for path in first if path.suffix == ".tif")


# --------------------------------------------------------------------------- manifests


def test_manifests(sites):
    out, manifests = sites
    assert manifests == [out / f"site-{k}" / "manifest.csv" for k in (1, 2, 3)]
    fractions = []
    for k, m in enumerate(manifests, start=1):
        rows = read_manifest(m)
        assert len(rows) == 6
        labels = [r["label"] for r in rows]
        assert set(labels) == set(LABELS)  # both classes at every site
        fractions.append(labels.count("adenocarcinoma") / len(labels))
        by_patient: dict[str, set[str]] = {}
        for j, r in enumerate(rows, start=1):
            assert r["slide"] == f"slides/slide-{j:03d}.tif"
            path = m.parent / r["slide"]
            assert path.is_file()
            assert re.fullmatch(rf"site-{k}-p\d{{3}}", r["patient"])
            by_patient.setdefault(r["patient"], set()).add(r["label"])
            with openslide.OpenSlide(str(path)) as s:
                w, h = s.dimensions
                assert 0.75 * 1024 - 16 <= w <= 1.25 * 1024 + 16
                assert 0.75 * 1024 - 16 <= h <= 1.25 * 1024 + 16
                assert json.loads(s.properties["tiff.ImageDescription"])["label"] == r["label"]
        assert all(len(v) == 1 for v in by_patient.values())  # a patient has one label
        # No temporary files left behind.
        assert not [p for p in m.parent.rglob(".*")]
    assert len(set(fractions)) > 1  # class balance differs between sites


def test_patients_with_two_slides_exist():
    rng = np.random.default_rng(0)
    labels = sg._site_labels(rng, 40, (0.3, 0.7))
    pats = sg._patients(rng, labels, "site-9")
    counts = {p: pats.count(p) for p in pats}
    assert max(counts.values()) == 2 and min(counts.values()) == 1
    for p in counts:
        assert len({lab for lab, q in zip(labels, pats, strict=True) if q == p}) == 1


def test_every_site_gets_both_classes():
    for seed in range(50):
        labels = sg._site_labels(np.random.default_rng(seed), 2, (0.0, 1.0))
        assert sorted(labels) == sorted(LABELS)


def test_fixed_size_and_progress(tmp_path, capsys):
    spec = SlideSpec(width=640, height=512)
    (m,) = make_site_slides(tmp_path, 1, 2, seed=1, spec=spec, vary_size=False, progress=True)
    for r in read_manifest(m):
        with openslide.OpenSlide(str(m.parent / r["slide"])) as s:
            assert s.dimensions == (640, 512)
    assert "[2/2]" in capsys.readouterr().err


# --------------------------------------------------------------------------- stain / classes


def test_site_stains_differ(sites):
    _, manifests = sites
    means = []
    for m in manifests:
        pix = []
        for r in read_manifest(m):
            if r["label"] != "adenoma":
                continue
            with openslide.OpenSlide(str(m.parent / r["slide"])) as s:
                lv = s.level_count - 1
                img = np.asarray(s.read_region((0, 0), lv, s.level_dimensions[lv]))[..., :3]
            pix.append(img[tissue_mask(img)].reshape(-1, 3))
        means.append(np.concatenate(pix).mean(0))
    for i in range(len(means)):
        for j in range(i + 1, len(means)):
            assert np.abs(means[i] - means[j]).max() > 3, (means[i], means[j])


def test_same_tissue_different_stain():
    st1, st2 = (site_stain(np.random.default_rng([1, k])) for k in (1, 2))
    assert st1 != st2
    a = render_tissue("adenoma", SMALL, st1, np.random.default_rng(2))
    b = render_tissue("adenoma", SMALL, st2, np.random.default_rng(2))
    t = tissue_mask(a) & tissue_mask(b)
    assert np.abs(a[t].mean(0) - b[t].mean(0)).max() > 3


def test_classes_separable_by_simple_statistics():
    dark = {lab: [] for lab in LABELS}
    lumen = {lab: [] for lab in LABELS}
    for i in range(4):
        stain = site_stain(np.random.default_rng([0, i]))
        for lab in LABELS:
            rgb = render_tissue(lab, SlideSpec(768, 768), stain, np.random.default_rng(100 + i))
            dark[lab].append(dark_fraction(rgb))
            lumen[lab].append(lumen_fraction(rgb))
    assert max(dark["adenoma"]) < min(dark["adenocarcinoma"]), dark
    assert np.mean(lumen["adenoma"]) > 2 * np.mean(lumen["adenocarcinoma"]), lumen


# --------------------------------------------------------------------------- cancer region


def test_cancer_region(tmp_path):
    region = (0.5, 0.2, 0.8, 0.6)
    spec = SlideSpec(1024, 1024)
    rgb = render_tissue("adenocarcinoma", spec, Stain(), np.random.default_rng(8), region)
    h, w = rgb.shape[:2]
    inside = np.zeros((h, w), bool)
    inside[int(0.2 * h) : int(0.6 * h), int(0.5 * w) : int(0.8 * w)] = True
    # A margin around the rectangle is excluded from "outside" (blurred edges).
    near = np.zeros((h, w), bool)
    near[int(0.2 * h) - 8 : int(0.6 * h) + 8, int(0.5 * w) - 8 : int(0.8 * w) + 8] = True
    assert tissue_mask(rgb)[inside].mean() > 0.95  # the region is tissue
    d_in = dark_fraction(rgb, inside)
    d_out = dark_fraction(rgb, ~near)
    plain = dark_fraction(render_tissue("adenocarcinoma", spec, Stain(), np.random.default_rng(8)))
    assert d_in > 2.5 * d_out, (d_in, d_out)
    assert d_in > 0.6 * plain

    info = make_slide(tmp_path / "cr.tif", "adenocarcinoma", spec, Stain(),
                      np.random.default_rng(8), cancer_region=region)
    assert info.cancer_region == region and info.levels >= 2
    with openslide.OpenSlide(str(info.path)) as s:
        assert json.loads(s.properties["tiff.ImageDescription"])["cancer_region"] == list(region)


@pytest.mark.parametrize(
    "label, region",
    [("adenoma", (0.1, 0.1, 0.5, 0.5)), ("adenocarcinoma", (0.5, 0.1, 0.4, 0.5)),
     ("adenocarcinoma", (0.0, 0.0, 1.2, 0.5)), ("carcinoma", None)],
)
def test_bad_arguments(label, region):
    with pytest.raises(ValueError):
        render_tissue(label, SMALL, Stain(), np.random.default_rng(0), region)
