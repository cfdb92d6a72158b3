"""Synthetic H&E tissue: what a generated slide shows, rendered as one RGB array at level 0.

Tests, demos and simulations need slides whose classes a model can tell apart and whose staining
differs from hospital to hospital, without patient data. Pixels follow the Beer-Lambert model of
``shared/he_stains.py``: each pixel holds an amount of haematoxylin and of eosin, and its colour is
the light of the glass attenuated by those amounts times the stains' optical-density vectors. A
site's ``Stain`` perturbs the vectors, their strengths and the glass, so the same tissue looks
different at each hospital.

- glass: near white, slight noise;
- tissue: irregular blobs (a smoothed low-resolution random field, thresholded) covering about
  35-55 % of the slide, pink fibrous stroma between the epithelium;
- ``adenoma``: orderly round or oval glands, a ring of pale-purple cytoplasm with one row of
  uniform, radially oriented dark nuclei around a white lumen;
- ``adenocarcinoma``: solid sheets and crowded irregular nests of large, pleomorphic, dark nuclei
  with only a few small lumens.

Structures have physical sizes (pixels at 0.5 µm/px, scaled to the slide's µm/px). Everything is
drawn from the ``numpy.random.Generator`` passed in: the same generator state gives the same array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from shared.he_stains import REFERENCE_H, compose, stain_matrix, unit

LABELS: tuple[str, str] = ("adenoma", "adenocarcinoma")

CancerRegion = tuple[float, float, float, float]
"""(x0, y0, x1, y1) as fractions of the slide's width and height, 0 <= x0 < x1 <= 1."""

GENERATED_EOSIN = (0.110, 0.870, 0.480)
"""Eosin's optical density here: a little redder than Ruifrok & Johnston's (``he_stains.REFERENCE_E``),
closer to what real slides give. Haematoxylin is theirs."""


@dataclass(frozen=True)
class SlideSpec:
    """A generated slide's level 0 (size, µm/px) and how its pyramid is stored (tile, JPEG quality)."""

    width: int = 2048
    height: int = 2048
    mpp: float = 0.5  # µm per pixel at level 0 (0.5: 20x)
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
    """A site's staining: the (R, G, B) optical densities of unit haematoxylin and eosin, how strongly
    each takes (``h_scale``, ``e_scale``) and the colour of glass without tissue."""

    h_od: tuple[float, float, float] = REFERENCE_H
    e_od: tuple[float, float, float] = GENERATED_EOSIN
    h_scale: float = 1.0
    e_scale: float = 1.0
    background: tuple[float, float, float] = (240.0, 240.0, 240.0)


def site_stain(rng: np.random.Generator, strength: float = 1.0) -> Stain:
    """A random but plausible site stain: hue shifts of both stains, their strengths, the glass colour.

    ``strength`` scales the size of the perturbation (0 gives the reference stain).
    """
    h_od = unit(np.clip(np.asarray(REFERENCE_H) + rng.normal(0.0, 0.08 * strength, 3), 0.01, None))
    e_od = unit(np.clip(np.asarray(GENERATED_EOSIN) + rng.normal(0.0, 0.10 * strength, 3), 0.01, None))
    h_scale = float(np.exp(rng.normal(0.0, 0.18 * strength)))
    e_scale = float(np.exp(rng.normal(0.0, 0.22 * strength)))
    grey = 240.0 + rng.uniform(-5.0, 8.0) * strength
    background = np.clip(grey + rng.normal(0.0, 3.0 * strength, 3), 215.0, 252.0)
    return Stain(h_od=_triple(h_od), e_od=_triple(e_od), h_scale=h_scale, e_scale=e_scale,
                 background=_triple(background))


def render_tissue(label: str, spec: SlideSpec, stain: Stain, rng: np.random.Generator,
                  cancer_region: Sequence[float] | None = None) -> np.ndarray:
    """A synthetic H&E slide at level 0 as a ``(height, width, 3)`` uint8 array.

    Args:
        label: one of ``LABELS``.
        spec: the slide's size and µm/px (structures keep their physical size).
        stain: the site's staining (``site_stain``; ``Stain()`` is the reference).
        rng: the only source of randomness: the same state gives the same array.
        cancer_region: ``(x0, y0, x1, y1)`` as fractions of width and height: the slide looks like
            an adenoma everywhere but in that rectangle, which holds adenocarcinoma. The label must
            then be ``"adenocarcinoma"``.
    """
    region = checked_slide(label, cancer_region)
    width, height = spec.width, spec.height
    scale = 0.5 / spec.mpp  # structure sizes below are in pixels at 0.5 µm/px

    tissue, soft_edges = _tissue_mask(rng, width, height)
    layers = _Layers(width, height)
    if region is None:
        if label == "adenoma":
            _draw_adenoma(layers, rng, tissue, scale)
        else:
            _draw_carcinoma(layers, rng, tissue, scale)
    else:
        x0 = min(int(round(region[0] * width)), width - 1)
        y0 = min(int(round(region[1] * height)), height - 1)
        x1 = max(int(round(region[2] * width)), x0 + 1)
        y1 = max(int(round(region[3] * height)), y0 + 1)
        tissue[y0:y1, x0:x1] = True  # the tumour region is always tissue
        soft_edges[y0:y1, x0:x1] = 255
        outside = tissue.copy()
        outside[y0:y1, x0:x1] = False
        _draw_adenoma(layers, rng, outside, scale)
        # Clear what the glands drew into the rectangle, then draw the tumour there.
        for image in (layers.epithelium, layers.lumen, layers.nuclei):
            image.paste(0, (x0, y0, x1, y1))
        _draw_carcinoma(layers, rng, tissue, scale, (x0, y0, x1, y1))
    _draw_stroma_cells(layers, rng, tissue & (np.asarray(layers.epithelium) == 0), scale)
    return _stained(layers, soft_edges, _stroma_density(rng, width, height), stain, rng)


def stained(haematoxylin: np.ndarray, eosin: np.ndarray, stain: Stain) -> np.ndarray:
    """RGB (uint8, shape ``(*shape, 3)``) of amounts of haematoxylin and eosin (arrays of one shape)
    through a site's stain: its vectors and strengths, light through its glass (Beer-Lambert,
    ``he_stains.compose``). Every generated pixel's colour comes from here.

    Args:
        haematoxylin: amount of haematoxylin per pixel (1: a nucleus' worth).
        eosin: amount of eosin per pixel, same shape.
        stain: the site's staining.
    """
    haematoxylin, eosin = np.asarray(haematoxylin, dtype=np.float32), np.asarray(eosin, dtype=np.float32)
    matrix = stain_matrix(stain.h_od, stain.e_od)
    strengths = np.array([stain.h_scale, stain.e_scale, 0.0], dtype=np.float32)
    amounts = np.stack([haematoxylin, eosin, np.zeros_like(eosin)], axis=-1)
    return compose(amounts.reshape(-1, 3) * strengths, matrix, (*eosin.shape, 3), stain.background)


def checked_slide(label: str, cancer_region: Sequence[float] | None) -> CancerRegion | None:
    """The slide's cancer region, checked with its label (ValueError saying what is wrong otherwise): a
    label of ``LABELS``, and a region only on an adenocarcinoma slide."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    region = checked_region(cancer_region) if cancer_region is not None else None
    if region is not None and label != "adenocarcinoma":
        raise ValueError("a slide with a cancer_region must be labelled 'adenocarcinoma'")
    return region


def checked_region(region: Sequence[float]) -> CancerRegion:
    """``region`` as a ``CancerRegion``; ValueError saying what is wrong with it otherwise."""
    if len(region) != 4:
        raise ValueError(f"cancer_region must be (x0, y0, x1, y1), got {region!r}")
    x0, y0, x1, y1 = (float(value) for value in region)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise ValueError(f"cancer_region must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1: {region!r}")
    return (x0, y0, x1, y1)


def _triple(values: np.ndarray) -> tuple[float, float, float]:
    first, second, third = (float(value) for value in values)
    return (first, second, third)


# Smooth random fields: tissue outlines, tumour nests, stroma fibres.


def gaussian_blur(array: np.ndarray, sigma: float, radius: int | None = None) -> np.ndarray:
    """The one blur here: scipy's Gaussian filter, radius 3 sigma unless given, edges reflected
    about the outer pixels (``mirror``: ... c b | a b c ...)."""
    if radius is None:
        radius = max(1, math.ceil(3 * sigma))
    return ndimage.gaussian_filter(array, sigma, mode="mirror", radius=radius)


def smooth_noise(rng: np.random.Generator, size: tuple[int, int], grid: tuple[int, int],
                 sigma: float) -> np.ndarray:
    """A smooth random field of ``size`` (width, height), about zero mean and unit variance: Gaussian
    noise on a ``grid`` of (columns, rows) cells, blurred by ``sigma`` cells, upsampled bicubically."""
    columns, rows = max(2, grid[0]), max(2, grid[1])
    field = gaussian_blur(rng.standard_normal((rows, columns)).astype(np.float32), sigma)
    field = (field - field.mean()) / (field.std() + 1e-6)
    return np.asarray(Image.fromarray(field).resize(size, Image.Resampling.BICUBIC), dtype=np.float32)


def _upsampled_uint8(fraction: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A [0, 1] field as uint8 (255 = 1), upsampled bilinearly to ``size`` (width, height)."""
    image = Image.fromarray(np.clip(fraction * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR))


def _level_set(field: np.ndarray, coverage: float) -> tuple[float, float]:
    """The threshold above which ``coverage`` of ``field`` lies, and the field's mean step between
    neighbouring columns: ``0.5 + (field - threshold) / (3 * step)`` ramps from 0 to 1 across an edge."""
    threshold = float(np.quantile(field, 1.0 - coverage))
    step = float(np.abs(np.diff(field, axis=1)).mean()) + 1e-6
    return threshold, step


def _blob_mask(rng: np.random.Generator, width: int, height: int, blob_px: float, coverage: float) -> np.ndarray:
    """Bool (height, width) mask of smooth random blobs about ``blob_px`` across, covering about
    ``coverage`` of it."""
    size = (max(8, width // 4), max(8, height // 4))
    grid = (max(3, round(width / blob_px)), max(3, round(height / blob_px)))
    field = smooth_noise(rng, size, grid, 1.0)
    threshold, step = _level_set(field, coverage)
    return _upsampled_uint8(0.5 + (field - threshold) / (3.0 * step), (width, height)) >= 128


def _tissue_mask(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Irregular tissue blobs covering about 35-55 % of the slide: a bool (height, width) mask and the
    same as uint8 with edges anti-aliased over about one pixel."""
    coverage = rng.uniform(0.36, 0.54)
    # A blurred field on a grid of about 48 cells: blobs of a few hundred px on a 2048-px slide.
    columns = max(8, round(48 * width / max(width, height)))
    rows = max(8, round(48 * height / max(width, height)))
    coarse = gaussian_blur(rng.standard_normal((rows, columns)).astype(np.float32), 3.0)
    coarse = (coarse - coarse.mean()) / (coarse.std() + 1e-6)
    # Worked on at about 8 px per cell of level 0, enough for the edges' detail.
    mid_width, mid_height = max(16, width // 8), max(16, height // 8)
    field = np.asarray(Image.fromarray(coarse).resize((mid_width, mid_height), Image.Resampling.BICUBIC))
    # Lowered towards the border, so blobs rarely touch the slide's edge.
    ys = np.linspace(-1, 1, mid_height, dtype=np.float32)[:, None]
    xs = np.linspace(-1, 1, mid_width, dtype=np.float32)[None, :]
    border = np.maximum(np.abs(xs), np.abs(ys))
    field = field - 2.5 * np.clip((border - 0.75) / 0.25, 0, 1) ** 2
    # Two octaves of finer noise make the edges irregular.
    for cells, amplitude in ((6, 0.22), (2, 0.08)):
        fine_width, fine_height = max(4, mid_width // cells), max(4, mid_height // cells)
        fine = gaussian_blur(rng.standard_normal((fine_height, fine_width)).astype(np.float32), 1.0)
        fine /= fine.std() + 1e-6
        field = field + amplitude * np.asarray(
            Image.fromarray(fine).resize((mid_width, mid_height), Image.Resampling.BICUBIC))
    # A steep ramp around the threshold, upsampled: the level set of an interpolated smooth field
    # has smooth edges.
    threshold, step = _level_set(field, coverage)
    ramp = _upsampled_uint8(0.5 + (field - threshold) / (3.0 * step), (width, height))
    # Steepened again at full resolution: a crisp edge, anti-aliased over about one pixel.
    steepen = np.clip((np.arange(256) - 127.5) * 32.0 + 128.0, 0, 255).astype(np.uint8)
    soft_edges = steepen[ramp]
    return soft_edges >= 128, soft_edges


def _stroma_density(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Eosin amount of stroma as uint8 (255 = amount 1): wavy collagen fibres and a slow drift."""
    size = (max(16, width // 4), max(16, height // 4))
    base = smooth_noise(rng, size, (max(4, size[0] // 16), max(4, size[1] // 16)), 1.0)
    fibres = (0.5 + 0.5 * np.sin(base * 9.0)) ** 2  # bands along the contours of a smooth field
    drift = smooth_noise(rng, size, (5, 5), 0.8)
    return _upsampled_uint8(0.28 + 0.10 * fibres + 0.03 * drift, (width, height))


# Drawing: cells and glands as filled polygons on greyscale layers.


class _Layers:
    """Greyscale layers (0..255) that the drawing fills and ``_stained`` turns into stain amounts."""

    def __init__(self, width: int, height: int) -> None:
        self.size = (width, height)
        self.epithelium = Image.new("L", self.size, 0)  # epithelial cytoplasm
        self.lumen = Image.new("L", self.size, 0)  # gland lumens, vacuoles: white space
        self.nuclei = Image.new("L", self.size, 0)  # nuclear haematoxylin
        self.draw_epithelium = ImageDraw.Draw(self.epithelium)
        self.draw_lumen = ImageDraw.Draw(self.lumen)
        self.draw_nuclei = ImageDraw.Draw(self.nuclei)


def _ellipse_polygons(cx: np.ndarray, cy: np.ndarray, a: np.ndarray, b: np.ndarray, theta: np.ndarray,
                      vertices: int, jitter: np.ndarray | None = None) -> np.ndarray:
    """Vertices (N, vertices, 2) of ellipses centred at (cx, cy) with semi-axes (a, b) turned by
    ``theta``; ``jitter`` (N, vertices) scales each vertex's radius."""
    angles = np.linspace(0.0, 2 * np.pi, vertices, endpoint=False)[None, :]
    radius = np.ones((len(cx), vertices)) if jitter is None else jitter
    along = a[:, None] * np.cos(angles) * radius
    across = b[:, None] * np.sin(angles) * radius
    cos, sin = np.cos(theta)[:, None], np.sin(theta)[:, None]
    x = cx[:, None] + along * cos - across * sin
    y = cy[:, None] + along * sin + across * cos
    return np.stack([x, y], axis=-1)


def _fill(draw: ImageDraw.ImageDraw, polygons: np.ndarray, values: Sequence[int] | int) -> None:
    """Fill each polygon (N, V, 2) with its value (or all with one)."""
    if isinstance(values, (int, np.integer)):
        values = [int(values)] * len(polygons)
    for polygon, value in zip(polygons.tolist(), values, strict=True):
        draw.polygon([tuple(point) for point in polygon], fill=int(value))


def _points_in_mask(rng: np.random.Generator, mask: np.ndarray, count: int,
                    box: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``count`` uniform random points (x, y) inside ``mask`` (rejection sampling in ``box``)."""
    height, width = mask.shape
    x0, y0, x1, y1 = box if box is not None else (0, 0, width, height)
    if count <= 0 or x1 <= x0 or y1 <= y0:
        return np.zeros(0), np.zeros(0)
    inside = max(float(mask[y0:y1, x0:x1].mean()), 1e-3)
    tries = int(count / inside * 1.05) + 16
    x = rng.uniform(x0, x1, tries)
    y = rng.uniform(y0, y1, tries)
    keep = mask[y.astype(np.int64).clip(0, height - 1), x.astype(np.int64).clip(0, width - 1)]
    return x[keep][:count], y[keep][:count]


def _draw_stroma_cells(layers: _Layers, rng: np.random.Generator, stroma: np.ndarray, scale: float) -> None:
    """Sparse fibroblasts (small spindles) and lymphocytes (small round dots) in the stroma."""
    area = float(stroma.sum())
    x, y = _points_in_mask(rng, stroma, int(area / (900 * scale * scale)))
    count = len(x)
    if count:
        length = rng.uniform(4.0, 7.0, count) * scale
        thickness = rng.uniform(1.2, 2.0, count) * scale
        spindles = _ellipse_polygons(x, y, length, thickness, rng.uniform(0, np.pi, count), 8)
        _fill(layers.draw_nuclei, spindles, rng.integers(150, 210, count))
    x, y = _points_in_mask(rng, stroma, int(area / (2500 * scale * scale)))
    count = len(x)
    if count:
        radius = rng.uniform(2.5, 3.5, count) * scale
        dots = _ellipse_polygons(x, y, radius, radius, np.zeros(count), 8)
        _fill(layers.draw_nuclei, dots, rng.integers(200, 240, count))


def _draw_adenoma(layers: _Layers, rng: np.random.Generator, tissue: np.ndarray, scale: float) -> None:
    """Orderly glands lying wholly inside ``tissue``: a ring of cytoplasm, one row of uniform columnar
    nuclei, a white lumen, a few goblet-cell vacuoles."""
    height, width = tissue.shape
    mean_radius = 52.0 * scale
    spacing = 2.35 * mean_radius
    # Gland centres on a jittered hexagonal grid.
    rows = int(height / (spacing * 0.866)) + 2
    columns = int(width / spacing) + 2
    grid_y, grid_x = np.mgrid[0:rows, 0:columns].astype(np.float64)
    cx = (grid_x * spacing + (grid_y % 2) * spacing / 2
          + rng.uniform(-0.12, 0.12, grid_x.shape) * spacing)
    cy = grid_y * spacing * 0.866 + rng.uniform(-0.12, 0.12, grid_y.shape) * spacing
    cx, cy = cx.ravel(), cy.ravel()
    on_slide = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
    cx, cy = cx[on_slide], cy[on_slide]
    count = len(cx)
    a = mean_radius * rng.uniform(0.8, 1.2, count)
    b = a * rng.uniform(0.6, 1.0, count)
    theta = rng.uniform(0, np.pi, count)
    wall = np.minimum(a, b) * rng.uniform(0.38, 0.46, count)  # epithelium's thickness
    # Kept: glands whose centre and 12 points just outside the rim are tissue, less a few gaps.
    rim = _ellipse_polygons(cx, cy, a + 4 * scale, b + 4 * scale, theta, 12)
    points = np.concatenate([np.stack([cx, cy], -1)[:, None], rim], axis=1)
    px = points[..., 0].astype(np.int64)
    py = points[..., 1].astype(np.int64)
    inside = (px >= 0) & (px < width) & (py >= 0) & (py < height)
    inside &= tissue[py.clip(0, height - 1), px.clip(0, width - 1)]
    keep = inside.all(axis=1) & (rng.random(count) < 0.93)
    cx, cy, a, b, theta, wall = cx[keep], cy[keep], a[keep], b[keep], theta[keep], wall[keep]
    count = len(cx)
    if count == 0:
        return
    _fill(layers.draw_epithelium, _ellipse_polygons(cx, cy, a, b, theta, 40), 255)
    _fill(layers.draw_lumen, _ellipse_polygons(cx, cy, a - wall, b - wall, theta, 40), 255)
    # Nuclei: one row near the basement membrane, evenly spaced, along the outward normal.
    nuclei: dict[str, list[np.ndarray]] = {key: [] for key in ("x", "y", "a", "b", "theta", "value")}
    step = 7.0 * scale
    for i in range(count):
        ra, rb = a[i] - 0.28 * wall[i], b[i] - 0.28 * wall[i]
        perimeter = math.pi * (3 * (ra + rb) - math.sqrt((3 * ra + rb) * (ra + 3 * rb)))  # Ramanujan
        per_gland = max(8, int(perimeter / step))
        angles = np.linspace(0, 2 * np.pi, per_gland, endpoint=False) + rng.uniform(0, 2 * np.pi)
        angles = angles + rng.normal(0, 0.15 / per_gland * 2 * np.pi, per_gland)
        along, across = ra * np.cos(angles), rb * np.sin(angles)
        cos, sin = math.cos(theta[i]), math.sin(theta[i])
        nuclei["x"].append(cx[i] + along * cos - across * sin)
        nuclei["y"].append(cy[i] + along * sin + across * cos)
        nuclei["theta"].append(np.arctan2(ra * np.sin(angles), rb * np.cos(angles)) + theta[i])
        nuclei["a"].append(np.full(per_gland, 0.28 * wall[i]) * rng.uniform(0.9, 1.1, per_gland))
        nuclei["b"].append(rng.uniform(2.3, 2.8, per_gland) * scale)
        nuclei["value"].append(rng.integers(185, 215, per_gland))
    joined = {key: np.concatenate(parts) for key, parts in nuclei.items()}
    polygons = _ellipse_polygons(joined["x"], joined["y"], joined["a"], joined["b"], joined["theta"], 10)
    _fill(layers.draw_nuclei, polygons, joined["value"])
    # Goblet-cell vacuoles in the epithelium (adenomas keep some mucin).
    vacuoles = count * 3
    gland = rng.integers(0, count, vacuoles)
    angle = rng.uniform(0, 2 * np.pi, vacuoles)
    depth = 1.0 - 0.62 * wall[gland] / np.minimum(a[gland], b[gland])
    along, across = a[gland] * depth * np.cos(angle), b[gland] * depth * np.sin(angle)
    cos, sin = np.cos(theta[gland]), np.sin(theta[gland])
    vx, vy = cx[gland] + along * cos - across * sin, cy[gland] + along * sin + across * cos
    radius = rng.uniform(2.5, 4.0, vacuoles) * scale
    _fill(layers.draw_lumen, _ellipse_polygons(vx, vy, radius, radius * 1.2, angle, 8), 200)


def _draw_carcinoma(layers: _Layers, rng: np.random.Generator, tissue: np.ndarray, scale: float,
                    box: tuple[int, int, int, int] | None = None) -> None:
    """Solid sheets and crowded irregular nests of large pleomorphic nuclei, a few small lumens,
    within ``box`` (x0, y0, x1, y1; default the whole slide)."""
    height, width = tissue.shape
    x0, y0, x1, y1 = box if box is not None else (0, 0, width, height)
    box_width, box_height = x1 - x0, y1 - y0
    # Tumour nests: about 75 % of the tissue is epithelium, strands of desmoplastic stroma between.
    nests = np.zeros_like(tissue)
    nests[y0:y1, x0:x1] = _blob_mask(rng, box_width, box_height, 70.0 * scale, 0.75)
    nests &= tissue
    layers.epithelium.paste(Image.fromarray(nests[y0:y1, x0:x1].astype(np.uint8) * 255), (x0, y0))
    area = float(nests[y0:y1, x0:x1].sum())
    # Nuclei: crowded (a jittered grid, some overlap), big, varying in size, shape, angle, darkness.
    spacing = 12.5 * scale
    grid_y, grid_x = np.mgrid[0 : int(box_height / spacing) + 1, 0 : int(box_width / spacing) + 1].astype(np.float64)
    x = (x0 + (grid_x + 0.5 + rng.uniform(-0.35, 0.35, grid_x.shape)) * spacing).ravel()
    y = (y0 + (grid_y + 0.5 + rng.uniform(-0.35, 0.35, grid_y.shape)) * spacing).ravel()
    keep = (x < x1) & (y < y1) & (rng.random(x.shape) < 0.92)
    keep &= nests[y.astype(np.int64).clip(0, height - 1), x.astype(np.int64).clip(0, width - 1)]
    x, y = x[keep], y[keep]
    count = len(x)
    if count:
        a = np.clip(rng.lognormal(math.log(5.4), 0.22, count), 3.0, 11.0) * scale
        b = a * rng.uniform(0.6, 0.95, count)
        jitter = rng.uniform(0.85, 1.15, (count, 10))
        polygons = _ellipse_polygons(x, y, a, b, rng.uniform(0, np.pi, count), 10, jitter)
        _fill(layers.draw_nuclei, polygons, rng.integers(190, 256, count))
    # A few small, irregular lumens (cribriform spaces).
    x, y = _points_in_mask(rng, nests, int(area / (14000 * scale * scale)), (x0, y0, x1, y1))
    count = len(x)
    if count:
        radius = rng.uniform(7.0, 15.0, count) * scale
        jitter = rng.uniform(0.7, 1.3, (count, 9))
        b = radius * rng.uniform(0.5, 1.0, count)
        polygons = _ellipse_polygons(x, y, radius, b, rng.uniform(0, np.pi, count), 9, jitter)
        _fill(layers.draw_lumen, polygons, 235)


# Staining: the layers' amounts of haematoxylin and eosin through the site's stain.

EDGE_SIGMA = 0.85
"""Drawn nuclei and lumens are softened by a 3 x 3 Gaussian of this sigma (weights about 1 : 2 : 1
along each axis): polygons filled without anti-aliasing would look cut out."""


def _stained(layers: _Layers, tissue: np.ndarray, stroma: np.ndarray, stain: Stain,
             rng: np.random.Generator) -> np.ndarray:
    """The layers as RGB: amounts of haematoxylin and eosin per pixel, composed through the site's
    stain with ``he_stains.compose`` (Beer-Lambert), plus per-pixel grain. Works in bands of rows so
    that the float32 temporaries stay small whatever the slide's size."""
    width, height = layers.size
    nuclei, lumen = np.asarray(layers.nuclei), np.asarray(layers.lumen)
    epithelium = np.asarray(layers.epithelium)
    out = np.empty((height, width, 3), dtype=np.uint8)
    band = max(1, (1 << 18) // width)
    for top in range(0, height, band):
        rows = slice(top, min(height, top + band))
        # One row beyond the band on each side, so the band's blur sees what the whole image's would.
        halo = slice(max(0, top - 1), min(height, top + band + 1))
        inner = slice(rows.start - halo.start, rows.stop - halo.start)
        nucleus = gaussian_blur(nuclei[halo].astype(np.float32) / 255, EDGE_SIGMA, radius=1)[inner]
        white = gaussian_blur(lumen[halo].astype(np.float32) / 255, EDGE_SIGMA, radius=1)[inner]
        cytoplasm = epithelium[rows].astype(np.float32) / 255
        fibres = stroma[rows].astype(np.float32) / 255
        inside = tissue[rows].astype(np.float32) / 255
        # Per-pixel grain, uniform with unit variance: chromatin texture, and the scanner's noise.
        grain = (rng.integers(0, 256, nucleus.shape, dtype=np.uint8).astype(np.float32) - 127.5) / 73.9
        # Eosin: the stroma's amount, replaced by the cytoplasm's in epithelium; a little haematoxylin
        # in stroma, more in cytoplasm; lumens are nearly empty.
        eosin = fibres + (0.36 - fibres) * cytoplasm + 0.025 * grain
        haematoxylin = 0.03 + 0.12 * cytoplasm
        kept = 1.0 - 0.9 * white
        eosin *= kept
        haematoxylin *= kept
        # Nuclei, with chromatin grain; they displace some eosin.
        haematoxylin += (1.35 + 0.15 * grain) * nucleus
        eosin *= 1.0 - 0.5 * nucleus
        rgb = stained(haematoxylin * inside, eosin * inside, stain)
        noisy = rgb + np.rint(1.5 * grain).astype(np.int16)[..., None]
        out[rows] = np.clip(noisy, 0, 255).astype(np.uint8)
    return out
