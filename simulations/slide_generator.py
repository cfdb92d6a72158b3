"""Synthetic H&E whole-slide images for tests and demos of the federated slide classifier.

Each generated slide is a real pyramidal, JPEG-tiled TIFF that OpenSlide opens with several
levels and a microns-per-pixel value, so the whole data path (tiling, tissue detection,
patch extraction, training) can be exercised without real patient data.

Content model
-------------
Pixels are composed with a Beer-Lambert stain model: every pixel has a haematoxylin density
``h`` and an eosin density ``e``; its colour is ``background * exp(-(h * H + e * E))`` where
``H`` and ``E`` are the optical-density vectors of the two stains.  A site's :class:`Stain`
perturbs those vectors, their strengths and the background, so the same tissue looks
different at each hospital.

* background: near white, slight noise;
* tissue: irregular blobs (a blurred low-resolution random field, thresholded) covering
  roughly 30-60 % of the slide, with pink fibrous stroma;
* ``"adenoma"``: orderly round/oval glands, i.e. a ring of pale-purple cytoplasm with one
  row of uniform, radially oriented dark nuclei around a white lumen;
* ``"adenocarcinoma"``: solid sheets and crowded irregular nests of large, pleomorphic,
  dark nuclei with only a few small lumens.

Everything is deterministic given the :class:`numpy.random.Generator` passed in, and
:func:`make_site_slides` derives one independent generator per (seed, site, slide).

Output layout of :func:`make_site_slides`::

    OUT/site-1/manifest.csv          # slide,label,patient
    OUT/site-1/slides/slide-001.tif
    ...

Pyramid and resolution
----------------------
Level 0 and each reduced level (/2 each, down to <= 512 px on the long side) are tiled pages
of the main IFD chain; the reduced ones carry ``NewSubfileType = 1`` (reduced image).
OpenSlide's (4.0.1) generic-TIFF reader reports ``openslide.mpp-x``/``mpp-y`` from level 0's
``XResolution``/``YResolution`` when ``ResolutionUnit`` is centimeter (3; ``mpp = 10000 /
XResolution``) or inch (2; ``mpp = 25400 / XResolution``); with unit none (1, tifffile's
default when no resolution is given) it reports no mpp.  We write centimeter and
``XResolution = YResolution = 10000 / mpp`` pixels per cm (20000 for 0.5 um/px).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "LABELS",
    "CancerRegion",
    "SlideInfo",
    "SlideSpec",
    "Stain",
    "make_site_slides",
    "make_slide",
    "render_tissue",
    "site_stain",
    "write_pyramid_tiff",
]

LABELS: tuple[str, str] = ("adenoma", "adenocarcinoma")

#: (x0, y0, x1, y1) as fractions of slide width/height, 0 <= x0 < x1 <= 1.
CancerRegion = tuple[float, float, float, float]

MANIFEST_HEADER = ("slide", "label", "patient")

# Reference optical-density vectors (about unit length): haematoxylin from Ruifrok & Johnston;
_REF_H = (0.650, 0.704, 0.286)
# eosin a little redder than their (0.072, 0.990, 0.105), closer to what real slides give.
_REF_E = (0.110, 0.870, 0.480)


@dataclass(frozen=True)
class SlideSpec:
    """Geometry and encoding of one generated slide (level 0)."""

    width: int = 2048
    height: int = 2048
    mpp: float = 0.5  # microns per pixel at level 0 (0.5 = 20x)
    tile: int = 256
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.width < 64 or self.height < 64:
            raise ValueError(f"slide must be at least 64x64 px, got {self.width}x{self.height}")
        if self.mpp <= 0:
            raise ValueError(f"mpp must be positive, got {self.mpp}")
        if self.tile <= 0 or self.tile % 16:
            raise ValueError(f"tile must be a positive multiple of 16, got {self.tile}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclass(frozen=True)
class Stain:
    """A site's staining: optical-density vectors, strengths and background colour.

    ``h_od``/``e_od`` are the (R, G, B) optical densities of unit haematoxylin/eosin;
    ``h_scale``/``e_scale`` scale how strongly each stain takes; ``background`` is the colour
    of glass without tissue.
    """

    h_od: tuple[float, float, float] = _REF_H
    e_od: tuple[float, float, float] = _REF_E
    h_scale: float = 1.0
    e_scale: float = 1.0
    background: tuple[float, float, float] = (240.0, 240.0, 240.0)


@dataclass(frozen=True)
class SlideInfo:
    """What :func:`make_slide` wrote."""

    path: Path
    label: str
    width: int
    height: int
    mpp: float
    cancer_region: CancerRegion | None = None
    levels: int = 1


# --------------------------------------------------------------------------- stain


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.01, None)
    return v / np.linalg.norm(v)


def site_stain(rng: np.random.Generator, strength: float = 1.0) -> Stain:
    """Draw a random but plausible site stain (hue shift of H and E, strengths, background).

    ``strength`` scales the size of the perturbation (0 gives the reference stain).
    """
    s = float(strength)
    h = _unit(np.asarray(_REF_H) + rng.normal(0.0, 0.08 * s, 3))
    e = _unit(np.asarray(_REF_E) + rng.normal(0.0, 0.10 * s, 3))
    h_scale = float(np.exp(rng.normal(0.0, 0.18 * s)))
    e_scale = float(np.exp(rng.normal(0.0, 0.22 * s)))
    base = 240.0 + rng.uniform(-5.0, 8.0) * s
    bg = np.clip(base + rng.normal(0.0, 3.0 * s, 3), 215.0, 252.0)
    return Stain(
        h_od=tuple(float(x) for x in h),  # type: ignore[arg-type]
        e_od=tuple(float(x) for x in e),  # type: ignore[arg-type]
        h_scale=h_scale,
        e_scale=e_scale,
        background=tuple(float(x) for x in bg),  # type: ignore[arg-type]
    )


# --------------------------------------------------------------------------- random fields


def _blur(arr: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (reflect padding) of a small float32 array."""
    if sigma <= 0:
        return arr
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1, dtype=np.float32) / sigma) ** 2)
    k /= k.sum()
    out = arr
    for axis in (0, 1):
        n = out.shape[axis]
        pad = [(0, 0), (0, 0)]
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect" if n > r else "edge")
        acc = np.zeros_like(out)
        for i, kv in enumerate(k):
            acc += kv * (p[i : i + n] if axis == 0 else p[:, i : i + n])
        out = acc
    return out


def _smooth_field(
    rng: np.random.Generator, size: tuple[int, int], cells: tuple[int, int], blur: float
) -> np.ndarray:
    """Smooth random field (about zero mean, unit variance): blurred ``cells`` noise,
    upsampled to ``size`` (w, h)."""
    cw, ch = max(2, cells[0]), max(2, cells[1])
    arr = _blur(rng.standard_normal((ch, cw)).astype(np.float32), blur)
    arr = (arr - arr.mean()) / (arr.std() + 1e-6)
    img = Image.fromarray(arr).resize(size, Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _upsample_u8(arr01: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a [0, 1] float field to ``size`` (w, h), returned as uint8."""
    img = Image.fromarray(np.clip(arr01 * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(img.resize(size, Image.Resampling.BILINEAR))


def _blob_mask(
    rng: np.random.Generator, w: int, h: int, cell_px: float, frac: float
) -> np.ndarray:
    """Bool HxW mask of smooth random blobs of ~``cell_px`` scale covering ~``frac`` of it."""
    lw, lh = max(8, w // 4), max(8, h // 4)
    cells = (max(3, round(w / cell_px)), max(3, round(h / cell_px)))
    f = _smooth_field(rng, (lw, lh), cells, 1.0)
    thr = float(np.quantile(f, 1.0 - frac))
    grad = float(np.abs(np.diff(f, axis=1)).mean()) + 1e-6
    return _upsample_u8(0.5 + (f - thr) / (3.0 * grad), (w, h)) >= 128


def _tissue_mask(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Irregular tissue blobs covering roughly 35-55 % of the slide.

    Returns ``(mask, soft)``: a bool HxW mask and a uint8 HxW version with anti-aliased edges.
    """
    coverage = rng.uniform(0.36, 0.54)
    # Coarse field on a ~48-cell grid, blurred: blobs of a few hundred px at 2048.
    lw = max(8, round(48 * w / max(w, h)))
    lh = max(8, round(48 * h / max(w, h)))
    coarse = _blur(rng.standard_normal((lh, lw)).astype(np.float32), 3.0)
    coarse = (coarse - coarse.mean()) / (coarse.std() + 1e-6)
    # Intermediate resolution (~8 px per cell at level 0) for the edge detail.
    mw, mh = max(16, w // 8), max(16, h // 8)
    field_m = np.asarray(Image.fromarray(coarse).resize((mw, mh), Image.Resampling.BICUBIC))
    # Taper towards the border so blobs rarely touch the slide edge.
    yy = np.linspace(-1, 1, mh, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, mw, dtype=np.float32)[None, :]
    taper = np.maximum(np.abs(xx), np.abs(yy))
    field_m = field_m - 2.5 * np.clip((taper - 0.75) / 0.25, 0, 1) ** 2
    # Finer roughness for irregular edges (two octaves).
    for cells, amp in ((6, 0.22), (2, 0.08)):
        fw, fh = max(4, mw // cells), max(4, mh // cells)
        fine = _blur(rng.standard_normal((fh, fw)).astype(np.float32), 1.0)
        fine /= fine.std() + 1e-6
        field_m = field_m + amp * np.asarray(
            Image.fromarray(fine).resize((mw, mh), Image.Resampling.BICUBIC)
        )
    thr = float(np.quantile(field_m, 1.0 - coverage))
    # Map the field around the threshold to 0..1 with a steep ramp, then upsample: the
    # level set of an interpolated smooth field gives smooth, anti-aliased edges.
    grad = float(np.abs(np.diff(field_m, axis=1)).mean()) + 1e-6
    ramp = 0.5 + (field_m - thr) / (3.0 * grad)
    up = _upsample_u8(ramp, (w, h))
    # Steepen at full resolution: a crisp edge, anti-aliased over about one pixel.
    lut = np.clip((np.arange(256) - 127.5) * 32.0 + 128.0, 0, 255).astype(np.uint8)
    soft = lut[up]
    return soft >= 128, soft


def _stroma_density(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Eosin density of stroma (uint8, 255 = density 1): wavy collagen fibres + slow drift."""
    lw, lh = max(16, w // 4), max(16, h // 4)
    base = _smooth_field(rng, (lw, lh), (max(4, lw // 16), max(4, lh // 16)), 1.0)
    fibres = 0.5 + 0.5 * np.sin(base * 9.0)  # contour bands of a smooth field
    fibres = fibres**2
    slow = _smooth_field(rng, (lw, lh), (5, 5), 0.8)
    dens = 0.28 + 0.10 * fibres + 0.03 * slow
    return _upsample_u8(dens, (w, h))


# --------------------------------------------------------------------------- drawing


def _ellipse_polys(
    cx: np.ndarray,
    cy: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    n_vertices: int,
    jitter: np.ndarray | None = None,
) -> np.ndarray:
    """Vertices (N, n_vertices, 2) of rotated ellipses, optionally with radial jitter."""
    t = np.linspace(0.0, 2 * np.pi, n_vertices, endpoint=False)[None, :]
    r = np.ones((len(cx), n_vertices)) if jitter is None else jitter
    px = a[:, None] * np.cos(t) * r
    py = b[:, None] * np.sin(t) * r
    c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
    x = cx[:, None] + px * c - py * s
    y = cy[:, None] + px * s + py * c
    return np.stack([x, y], axis=-1)


def _draw_polys(
    draw: ImageDraw.ImageDraw, polys: np.ndarray, values: Sequence[int] | int
) -> None:
    """Fill each polygon (N, V, 2) with its value."""
    if isinstance(values, (int, np.integer)):
        values = [int(values)] * len(polys)
    for poly, v in zip(polys.tolist(), values):
        draw.polygon([tuple(p) for p in poly], fill=int(v))


def _sample_in_mask(
    rng: np.random.Generator, mask: np.ndarray, n: int, box: tuple[int, int, int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random points (x, y) inside ``mask`` (rejection sampling on ``box``)."""
    h, w = mask.shape
    x0, y0, x1, y1 = box if box is not None else (0, 0, w, h)
    if n <= 0 or x1 <= x0 or y1 <= y0:
        return np.zeros(0), np.zeros(0)
    frac = max(float(mask[y0:y1, x0:x1].mean()), 1e-3)
    m = int(n / frac * 1.05) + 16
    x = rng.uniform(x0, x1, m)
    y = rng.uniform(y0, y1, m)
    keep = mask[y.astype(np.int64).clip(0, h - 1), x.astype(np.int64).clip(0, w - 1)]
    return x[keep][:n], y[keep][:n]


class _Layers:
    """Greyscale drawing layers (0..255) that are turned into stain densities at the end."""

    def __init__(self, w: int, h: int) -> None:
        self.size = (w, h)
        self.epi = Image.new("L", self.size, 0)  # epithelial cytoplasm
        self.lumen = Image.new("L", self.size, 0)  # gland lumen / white space
        self.nuc = Image.new("L", self.size, 0)  # nuclear haematoxylin density
        self.d_epi = ImageDraw.Draw(self.epi)
        self.d_lumen = ImageDraw.Draw(self.lumen)
        self.d_nuc = ImageDraw.Draw(self.nuc)


def _stroma_cells(
    layers: _Layers, rng: np.random.Generator, where: np.ndarray, scale: float
) -> None:
    """Sparse fibroblasts (small spindles) and lymphocytes (small round dots) in stroma."""
    area = float(where.sum())
    n_fib = int(area / (900 * scale * scale))
    x, y = _sample_in_mask(rng, where, n_fib)
    n = len(x)
    if n:
        a = rng.uniform(4.0, 7.0, n) * scale
        b = rng.uniform(1.2, 2.0, n) * scale
        polys = _ellipse_polys(x, y, a, b, rng.uniform(0, np.pi, n), 8)
        _draw_polys(layers.d_nuc, polys, rng.integers(150, 210, n))
    n_lym = int(area / (2500 * scale * scale))
    x, y = _sample_in_mask(rng, where, n_lym)
    n = len(x)
    if n:
        r = rng.uniform(2.5, 3.5, n) * scale
        polys = _ellipse_polys(x, y, r, r, np.zeros(n), 8)
        _draw_polys(layers.d_nuc, polys, rng.integers(200, 240, n))


def _draw_adenoma(
    layers: _Layers, rng: np.random.Generator, tissue: np.ndarray, scale: float
) -> None:
    """Orderly glands: ring of cytoplasm, one row of uniform columnar nuclei, white lumen.

    Only glands lying wholly inside ``tissue`` are drawn."""
    h, w = tissue.shape
    x0, y0, x1, y1 = 0, 0, w, h
    r_mean = 52.0 * scale
    spacing = 2.35 * r_mean
    # Jittered hexagonal grid of gland centres.
    rows = int((y1 - y0) / (spacing * 0.866)) + 2
    cols = int((x1 - x0) / spacing) + 2
    gy, gx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    cx = x0 + gx * spacing + (gy % 2) * spacing / 2 + rng.uniform(-0.12, 0.12, gx.shape) * spacing
    cy = y0 + gy * spacing * 0.866 + rng.uniform(-0.12, 0.12, gy.shape) * spacing
    cx, cy = cx.ravel(), cy.ravel()
    inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    cx, cy = cx[inside], cy[inside]
    n = len(cx)
    a = r_mean * rng.uniform(0.8, 1.2, n)
    b = a * rng.uniform(0.6, 1.0, n)
    theta = rng.uniform(0, np.pi, n)
    thick = np.minimum(a, b) * rng.uniform(0.38, 0.46, n)
    # Keep glands that lie wholly inside tissue (centre and 12 points just outside the rim).
    rim = _ellipse_polys(cx, cy, a + 4 * scale, b + 4 * scale, theta, 12)
    pts = np.concatenate([np.stack([cx, cy], -1)[:, None], rim], axis=1)
    ix = pts[..., 0].astype(np.int64)
    iy = pts[..., 1].astype(np.int64)
    ok = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    ok &= tissue[iy.clip(0, h - 1), ix.clip(0, w - 1)]
    keep = ok.all(axis=1) & (rng.random(n) < 0.93)  # and a few gaps
    cx, cy, a, b, theta, thick = cx[keep], cy[keep], a[keep], b[keep], theta[keep], thick[keep]
    n = len(cx)
    if n == 0:
        return
    outer = _ellipse_polys(cx, cy, a, b, theta, 40)
    inner = _ellipse_polys(cx, cy, a - thick, b - thick, theta, 40)
    _draw_polys(layers.d_epi, outer, 255)
    _draw_polys(layers.d_lumen, inner, 255)
    # Nuclei: one row near the basement membrane, radially oriented, evenly spaced.
    nx, ny, na, nb, nt, nv = [], [], [], [], [], []
    step = 7.0 * scale
    for i in range(n):
        ra, rb = a[i] - 0.28 * thick[i], b[i] - 0.28 * thick[i]
        perim = math.pi * (3 * (ra + rb) - math.sqrt((3 * ra + rb) * (ra + 3 * rb)))
        k = max(8, int(perim / step))
        t = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 2 * np.pi)
        t = t + rng.normal(0, 0.15 / k * 2 * np.pi, k)
        px, py = ra * np.cos(t), rb * np.sin(t)
        c, s = math.cos(theta[i]), math.sin(theta[i])
        nx.append(cx[i] + px * c - py * s)
        ny.append(cy[i] + px * s + py * c)
        # Orientation along the outward normal of the ellipse.
        nt.append(np.arctan2(ra * np.sin(t), rb * np.cos(t)) + theta[i])
        na.append(np.full(k, 0.28 * thick[i]) * rng.uniform(0.9, 1.1, k))
        nb.append(rng.uniform(2.3, 2.8, k) * scale)
        nv.append(rng.integers(185, 215, k))
    polys = _ellipse_polys(
        np.concatenate(nx), np.concatenate(ny), np.concatenate(na), np.concatenate(nb),
        np.concatenate(nt), 10,
    )
    _draw_polys(layers.d_nuc, polys, np.concatenate(nv))
    # A few goblet-cell vacuoles in the epithelium (adenomas keep some mucin).
    m = n * 3
    gi = rng.integers(0, n, m)
    gt = rng.uniform(0, 2 * np.pi, m)
    gr = 1.0 - 0.62 * thick[gi] / np.minimum(a[gi], b[gi])
    gpx, gpy = a[gi] * gr * np.cos(gt), b[gi] * gr * np.sin(gt)
    c, s = np.cos(theta[gi]), np.sin(theta[gi])
    gxs, gys = cx[gi] + gpx * c - gpy * s, cy[gi] + gpx * s + gpy * c
    rr = rng.uniform(2.5, 4.0, m) * scale
    _draw_polys(layers.d_lumen, _ellipse_polys(gxs, gys, rr, rr * 1.2, gt, 8), 200)


def _draw_carcinoma(
    layers: _Layers, rng: np.random.Generator, tissue: np.ndarray, scale: float,
    box: tuple[int, int, int, int] | None = None,
) -> None:
    """Solid sheets / crowded irregular nests of large pleomorphic nuclei, few small lumens."""
    h, w = tissue.shape
    x0, y0, x1, y1 = box if box is not None else (0, 0, w, h)
    bw, bh = x1 - x0, y1 - y0
    # Tumour nests: a medium-scale field thresholded so ~75 % of the tissue is epithelium,
    # leaving strands of desmoplastic stroma between nests.
    nest = np.zeros_like(tissue)
    nest[y0:y1, x0:x1] = _blob_mask(rng, bw, bh, 70.0 * scale, 0.75)
    nest &= tissue
    layers.epi.paste(Image.fromarray(nest[y0:y1, x0:x1].astype(np.uint8) * 255), (x0, y0))
    area = float(nest[y0:y1, x0:x1].sum())
    # Nuclei: crowded (jittered grid, some overlap), big, variable size, shape, orientation
    # and darkness.
    sp = 12.5 * scale
    gy, gx = np.mgrid[0 : int(bh / sp) + 1, 0 : int(bw / sp) + 1].astype(np.float64)
    x = (x0 + (gx + 0.5 + rng.uniform(-0.35, 0.35, gx.shape)) * sp).ravel()
    y = (y0 + (gy + 0.5 + rng.uniform(-0.35, 0.35, gy.shape)) * sp).ravel()
    ok = (x < x1) & (y < y1) & (rng.random(x.shape) < 0.92)
    ok &= nest[y.astype(np.int64).clip(0, h - 1), x.astype(np.int64).clip(0, w - 1)]
    x, y = x[ok], y[ok]
    n = len(x)
    if n:
        a = np.clip(rng.lognormal(math.log(5.4), 0.22, n), 3.0, 11.0) * scale
        b = a * rng.uniform(0.6, 0.95, n)
        jitter = rng.uniform(0.85, 1.15, (n, 10))
        polys = _ellipse_polys(x, y, a, b, rng.uniform(0, np.pi, n), 10, jitter)
        _draw_polys(layers.d_nuc, polys, rng.integers(190, 256, n))
    # A few small, irregular lumens (cribriform spaces).
    n_lum = int(area / (14000 * scale * scale))
    x, y = _sample_in_mask(rng, nest, n_lum, (x0, y0, x1, y1))
    k = len(x)
    if k:
        r = rng.uniform(7.0, 15.0, k) * scale
        jit = rng.uniform(0.7, 1.3, (k, 9))
        b = r * rng.uniform(0.5, 1.0, k)
        polys = _ellipse_polys(x, y, r, b, rng.uniform(0, np.pi, k), 9, jit)
        _draw_polys(layers.d_lumen, polys, 235)


def _check_region(region: Sequence[float]) -> CancerRegion:
    if len(region) != 4:
        raise ValueError(f"cancer_region must be (x0, y0, x1, y1), got {region!r}")
    x0, y0, x1, y1 = (float(v) for v in region)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(
            f"cancer_region must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1: {region!r}"
        )
    return (x0, y0, x1, y1)


def render_tissue(
    label: str,
    spec: SlideSpec,
    stain: Stain,
    rng: np.random.Generator,
    cancer_region: Sequence[float] | None = None,
) -> np.ndarray:
    """Render a synthetic H&E slide at level 0 as an ``(height, width, 3)`` uint8 array.

    ``label`` is one of :data:`LABELS`.  With ``cancer_region=(x0, y0, x1, y1)`` (fractions
    of width/height) the slide is adenoma-looking everywhere except that rectangle, which is
    filled with adenocarcinoma-like tissue; the label must then be ``"adenocarcinoma"``.
    Deterministic given the state of ``rng``.
    """
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    region = _check_region(cancer_region) if cancer_region is not None else None
    if region is not None and label != "adenocarcinoma":
        raise ValueError("a slide with a cancer_region must be labelled 'adenocarcinoma'")
    w, h = spec.width, spec.height
    scale = 0.5 / spec.mpp  # structure sizes are physical: px at 0.5 um/px

    tissue, soft = _tissue_mask(rng, w, h)
    layers = _Layers(w, h)
    if region is None:
        if label == "adenoma":
            _draw_adenoma(layers, rng, tissue, scale)
        else:
            _draw_carcinoma(layers, rng, tissue, scale)
    else:
        rx0 = min(int(round(region[0] * w)), w - 1)
        ry0 = min(int(round(region[1] * h)), h - 1)
        rx1, ry1 = int(round(region[2] * w)), int(round(region[3] * h))
        rx1, ry1 = max(rx1, rx0 + 1), max(ry1, ry0 + 1)
        # The tumour region is always tissue.
        tissue[ry0:ry1, rx0:rx1] = True
        soft[ry0:ry1, rx0:rx1] = 255
        outside = tissue.copy()
        outside[ry0:ry1, rx0:rx1] = False
        _draw_adenoma(layers, rng, outside, scale)
        # Clear anything the glands drew into the rectangle, then draw the tumour there.
        for img in (layers.epi, layers.lumen, layers.nuc):
            img.paste(0, (rx0, ry0, rx1, ry1))
        _draw_carcinoma(layers, rng, tissue, scale, (rx0, ry0, rx1, ry1))
    # Sparse stroma cells between the epithelium.
    _stroma_cells(layers, rng, tissue & (np.asarray(layers.epi) == 0), scale)
    return _compose(layers, soft, _stroma_density(rng, w, h), stain, rng)


_SMOOTH3 = ImageFilter.Kernel((3, 3), [1, 2, 1, 2, 4, 2, 1, 2, 1])


def _compose(
    layers: _Layers, tissue: np.ndarray, stroma: np.ndarray, stain: Stain, rng: np.random.Generator
) -> np.ndarray:
    """Turn the drawing layers into RGB with the Beer-Lambert stain model.

    Works in bands of rows so the float32 temporaries stay in cache.
    """
    w, h = layers.size
    nuc = np.asarray(layers.nuc.filter(_SMOOTH3))
    lumen = np.asarray(layers.lumen.filter(_SMOOTH3))
    epi = np.asarray(layers.epi)
    hv = np.asarray(stain.h_od, dtype=np.float32) * np.float32(stain.h_scale)
    ev = np.asarray(stain.e_od, dtype=np.float32) * np.float32(stain.e_scale)
    bg = np.asarray(stain.background, dtype=np.float32)
    f = np.float32(1.0 / 255.0)
    out = np.empty((h, w, 3), dtype=np.uint8)
    band = max(1, (1 << 18) // w)
    for y0 in range(0, h, band):
        sl = slice(y0, min(h, y0 + band))
        nu = nuc[sl].astype(np.float32)
        nu *= f
        lu = lumen[sl].astype(np.float32)
        lu *= f
        ep = epi[sl].astype(np.float32)
        ep *= f
        es = stroma[sl].astype(np.float32)
        es *= f
        t = tissue[sl].astype(np.float32)
        t *= f
        # Per-pixel grain, uniform with unit variance.
        grain = rng.integers(0, 256, nu.shape, dtype=np.uint8).astype(np.float32)
        grain -= np.float32(127.5)
        grain *= np.float32(1.0 / 73.9)

        # Eosin: stroma density, replaced by cytoplasm density in epithelium.
        e = np.float32(0.36) - es
        e *= ep
        e += es
        e += np.float32(0.025) * grain
        # Haematoxylin background: a little in stroma, more in epithelial cytoplasm.
        hd = ep * np.float32(0.12)
        hd += np.float32(0.03)
        keep = lu * np.float32(-0.9)
        keep += np.float32(1.0)
        e *= keep
        hd *= keep
        # Nuclei, with chromatin grain; they displace some eosin.
        chrom = grain * np.float32(0.15)
        chrom += np.float32(1.35)
        chrom *= nu
        hd += chrom
        nu *= np.float32(-0.5)
        nu += np.float32(1.0)
        e *= nu
        hd *= t
        e *= t

        grain *= np.float32(1.5)
        for c in range(3):
            od = hd * hv[c]
            od += e * ev[c]
            np.negative(od, out=od)
            np.exp(od, out=od)
            od *= bg[c]
            od += grain
            np.clip(od, 0, 255, out=od)
            out[sl, :, c] = od  # float -> uint8 truncation, deterministic
    return out


# --------------------------------------------------------------------------- TIFF


#: Reduced levels are added until the long side is at most this many pixels.
MIN_LEVEL_SIZE = 512


def _level_sizes(width: int, height: int) -> list[tuple[int, int]]:
    """(w, h) of each pyramid level: level 0, then /2 (rounded up, as ``Image.reduce``)
    until the long side is <= :data:`MIN_LEVEL_SIZE` (or the short side would drop below 16)."""
    sizes = [(width, height)]
    while max(sizes[-1]) > MIN_LEVEL_SIZE and min(sizes[-1]) >= 32:
        w, h = sizes[-1]
        sizes.append(((w + 1) // 2, (h + 1) // 2))
    return sizes


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_pyramid_tiff(
    path: Path,
    rgb: np.ndarray,
    mpp: float,
    tile: int = 256,
    quality: int = 90,
    description: str | None = None,
) -> None:
    """Write ``rgb`` (HxWx3 uint8) as a pyramidal JPEG-tiled TIFF, atomically.

    Level 0 plus reduced levels (each /2, until the long side is <= 512 px) as further tiled
    pages with ``subfiletype=1``.  Resolution tags are in pixels per centimeter
    (``10000 / mpp``, ``ResolutionUnit = CENTIMETER``), which OpenSlide reports as
    ``openslide.mpp-x``/``mpp-y``.  ``description`` goes into level 0's ImageDescription.
    """
    path = Path(path)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be HxWx3 uint8, got {rgb.shape} {rgb.dtype}")
    if mpp <= 0:
        raise ValueError("mpp must be positive")
    levels = [np.ascontiguousarray(rgb)]
    img = Image.fromarray(rgb)
    for _ in _level_sizes(rgb.shape[1], rgb.shape[0])[1:]:
        img = img.reduce(2)
        levels.append(np.asarray(img))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tw:
            for i, lv in enumerate(levels):
                px_per_cm = 1e4 / (mpp * 2**i)
                tw.write(
                    lv,
                    photometric="rgb",
                    tile=(tile, tile),
                    compression="jpeg",
                    compressionargs={"level": int(quality)},
                    resolution=(px_per_cm, px_per_cm),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if i == 0 else 1,
                    description=description if i == 0 else None,
                    metadata=None,
                    software="fedpath.simulations.slide_generator",
                )
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_slide(
    path: Path,
    label: str,
    spec: SlideSpec,
    stain: Stain,
    rng: np.random.Generator,
    cancer_region: Sequence[float] | None = None,
) -> SlideInfo:
    """Render one slide and write it to ``path``; return what was written.

    The label, mpp and cancer region are also stored as JSON in level 0's ImageDescription
    (OpenSlide property ``tiff.ImageDescription``).
    """
    region = _check_region(cancer_region) if cancer_region is not None else None
    rgb = render_tissue(label, spec, stain, rng, region)
    meta = {
        "generator": "fedpath-synthetic",
        "label": label,
        "mpp": spec.mpp,
        "cancer_region": list(region) if region else None,
    }
    write_pyramid_tiff(path, rgb, spec.mpp, spec.tile, spec.jpeg_quality, json.dumps(meta))
    n_levels = len(_level_sizes(spec.width, spec.height))
    return SlideInfo(Path(path), label, spec.width, spec.height, spec.mpp, region, n_levels)


# --------------------------------------------------------------------------- sites


def _site_labels(rng: np.random.Generator, n: int, frac_range: tuple[float, float]) -> list[str]:
    """Labels for one site: adenocarcinoma fraction drawn from ``frac_range``, both classes
    present when ``n >= 2``, in random order."""
    frac = rng.uniform(*frac_range)
    n_car = int(round(frac * n))
    if n >= 2:
        n_car = min(max(n_car, 1), n - 1)
    labels = [LABELS[1]] * n_car + [LABELS[0]] * (n - n_car)
    return [labels[i] for i in rng.permutation(n)]


def _patients(rng: np.random.Generator, labels: list[str], site_name: str) -> list[str]:
    """Patient ids: about a quarter of patients contribute two slides (same label)."""
    out: list[str] = []
    pending: dict[str, str] = {}  # label -> patient id waiting for a second slide
    count = 0
    for lab in labels:
        if lab in pending:
            out.append(pending.pop(lab))
            continue
        count += 1
        pid = f"{site_name}-p{count:03d}"
        out.append(pid)
        if rng.random() < 0.3:
            pending[lab] = pid
    return out


def _write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_HEADER)
    writer.writerows(rows)
    tmp = _tmp_path(path)
    try:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_site_slides(
    out_dir: Path,
    sites: int,
    slides_per_site: int,
    seed: int,
    spec: SlideSpec = SlideSpec(),
    progress: bool = False,
    vary_size: bool = True,
    cancer_fraction_range: tuple[float, float] = (0.3, 0.7),
) -> list[Path]:
    """Generate ``sites`` hospitals with ``slides_per_site`` slides each; return manifest paths.

    Writes ``out_dir/site-<k>/slides/slide-<nnn>.tif`` and ``out_dir/site-<k>/manifest.csv``
    (``slide,label,patient``; ``slide`` relative to the manifest's folder).  Each site has
    its own stain (:func:`site_stain`) and its own adenocarcinoma fraction drawn from
    ``cancer_fraction_range``; with ``slides_per_site >= 2`` every site has both classes.
    With ``vary_size`` each slide's width and height are jittered by up to +-25 %.
    Deterministic in ``seed``: slide ``j`` of site ``k`` uses its own generator seeded by
    ``(seed, k, j)``.  Files are written atomically.
    """
    if sites < 1 or slides_per_site < 1:
        raise ValueError("sites and slides_per_site must be >= 1")
    lo, hi = cancer_fraction_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"bad cancer_fraction_range {cancer_fraction_range!r}")
    out_dir = Path(out_dir)
    manifests: list[Path] = []
    total = sites * slides_per_site
    done = 0
    t_start = time.perf_counter()
    for k in range(1, sites + 1):
        name = f"site-{k}"
        site_rng = np.random.default_rng([seed, k])
        stain = site_stain(site_rng)
        labels = _site_labels(site_rng, slides_per_site, (lo, hi))
        patients = _patients(site_rng, labels, name)
        site_dir = out_dir / name
        rows: list[tuple[str, str, str]] = []
        for j, (label, patient) in enumerate(zip(labels, patients), start=1):
            rng = np.random.default_rng([seed, k, j])
            s = spec
            if vary_size:
                fw, fh = rng.uniform(0.75, 1.25, 2)
                s = SlideSpec(
                    width=max(64, int(round(spec.width * fw / 16)) * 16),
                    height=max(64, int(round(spec.height * fh / 16)) * 16),
                    mpp=spec.mpp, tile=spec.tile, jpeg_quality=spec.jpeg_quality,
                )
            rel = f"slides/slide-{j:03d}.tif"
            make_slide(site_dir / rel, label, s, stain, rng)
            rows.append((rel, label, patient))
            done += 1
            if progress:
                print(
                    f"[{done}/{total}] {name}/{rel} {label} {s.width}x{s.height} "
                    f"({time.perf_counter() - t_start:.1f}s)",
                    file=sys.stderr,
                    flush=True,
                )
        manifest = site_dir / "manifest.csv"
        _write_manifest(manifest, rows)
        manifests.append(manifest)
    return manifests
