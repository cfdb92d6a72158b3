"""Hospital-size synthetic slides (80000 x 60000 px and more), rendered region by region.

``tissue_rendering.render_tissue`` draws a whole slide as one array: fine up to a few thousand
pixels a side, but a scanner's 80000 x 60000 px at 0.25 µm/px would need tens of GB. Here every
pixel of every pyramid level is a function of its position, so any tile can be rendered on its own
and ``pyramidal_tiff.write_pyramid_tiff_tiles`` streams the slide to disk with memory that does not
grow with its size. Only the tissue layout is stored: a few hundred cells a side.

What a pixel shows:

- layout: a handful of tissue fragments (rotated ellipses with noisy outlines) on background glass,
  covering 35-55 % of the slide, drawn at low resolution from the slide's generator; finer noise,
  evaluated per tile, makes the outlines irregular at full resolution;
- texture: smooth random fields and jittered grids of cells, both from a hash of (seed, position),
  so a tile needs nothing but its coordinates: pink fibrous stroma with scattered fibroblasts and
  lymphocytes; for ``adenoma`` orderly glands (a ring of cytoplasm, a row of nuclei, a white
  lumen); for ``adenocarcinoma`` nests of crowded, large, dark nuclei with a few small lumens;
- colour: materials (glass, stroma, cytoplasm, lumen, nucleus) stained through the site's ``Stain``
  with ``tissue_rendering.stained`` (Beer-Lambert), mixed by how much of a pixel each covers.

Reduced levels are not downsampled from level 0, which would need it in memory: each level is
rendered from the same fields at its own scale so that it looks like the downsampled level 0.
A level-``L`` pixel is the mean of ``2**L x 2**L`` level-0 pixels, so:

- smooth fields are box-filtered exactly (their interpolation weights are averaged over the pixel);
- a threshold of a field (tissue edge, tumour nests) gives the expected coverage, accounting for
  the variation the filter removed (a Gaussian model of what lies inside the pixel);
- cells (nuclei, glands) are drawn as anti-aliased shapes while they span several pixels, and as
  their expected coverage (cell density x mean area) once they are smaller;
- colours are mixed linearly from coverages, as the mean of level-0 pixels mixes them.

Sizes are physical (µm), so a slide at 0.25 µm/px shows the same tissue as one at 0.5 µm/px.
Everything is deterministic: the same generator state gives the same pixels, whatever the tiles.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import ndtri

from simulations.tissue_rendering import (
    SlideSpec,
    Stain,
    checked_slide,
    gaussian_blur,
    smooth_noise,
    stained,
)

LAYOUT_CELLS = 384
"""The tissue layout has this many cells along the slide's long side."""

GLAND_RADIUS_UM = 26.0
GLAND_SPACING_UM = 2.35 * GLAND_RADIUS_UM
RING_NUCLEUS_STEP_UM = 3.5  # between neighbouring nuclei along a gland's ring
RING_NUCLEUS_HALF_WIDTH_UM = 1.25
CARCINOMA_NEST_UM = 35.0  # size of the tumour nests' random field
CARCINOMA_NEST_COVERAGE = 0.75
FIBRE_FIELD_UM = 32.0  # the stroma's collagen bands follow the contours of a field of this size
EDGE_OCTAVES_UM = ((120.0, 0.45), (30.0, 0.35))
"""Finer noise on the tissue outline: (cell size, displacement of the edge as a fraction of it)."""

GRAIN = 1.5
"""Standard deviation of the per-pixel noise at level 0, grey levels (a level-L pixel averages 4**L)."""

_GLASS_ONLY = 1.0 / 1024  # tissue coverage below this is glass: whole tiles of it take a short cut


# --------------------------------------------------------------------------- hashing


_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_ROWS = np.uint64(0x9E3779B97F4A7C15)
_COLUMNS = np.uint64(0xC2B2AE3D27D4EB4F)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: every input bit flips about half the output bits."""
    z = z ^ (z >> np.uint64(30))
    z = z * _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


@functools.lru_cache(maxsize=4096)
def _key(*parts: int) -> np.uint64:
    """One 64-bit hash of integers: the seed of one random field or grid of cells."""
    z = np.zeros(1, dtype=np.uint64)
    for part in parts:
        z = _mix(z ^ np.asarray([int(part) % 2**64], dtype=np.uint64))
    return z[0]


@functools.lru_cache(maxsize=256)
def _keys(key: int, count: int) -> np.ndarray:
    """``count`` keys derived from one, shaped ``(count, 1, 1)`` to draw several attributes per cell at once."""
    return np.array([_key(key, index) for index in range(count)], dtype=np.uint64)[:, None, None]


def _uniform(key: np.uint64 | np.ndarray, rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float32 per (key, row, column) (broadcast), a pure function of key and indices."""
    rows = np.asarray(rows, dtype=np.int64).astype(np.uint64)
    columns = np.asarray(columns, dtype=np.int64).astype(np.uint64)
    z = _mix(_mix(rows * _ROWS ^ key) ^ columns * _COLUMNS)
    return ((z >> np.uint64(40)).astype(np.float32)) * np.float32(2.0**-24)


def _lattice(key: np.uint64, row0: int, rows: int, column0: int, columns: int) -> np.ndarray:
    """Random values, mean 0 and variance 1, on the lattice points ``[row0, row0 + rows) x [column0, ...)``."""
    values = _uniform(key, np.arange(row0, row0 + rows)[:, None], np.arange(column0, column0 + columns)[None, :])
    return (values - np.float32(0.5)) * np.float32(math.sqrt(12.0))


# --------------------------------------------------------------------------- smooth fields


def _bspline(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Uniform cubic B-spline weights of the four lattice points around fraction ``t`` in [0, 1)."""
    s = 1.0 - t
    t2 = t * t
    return (s * s * s / 6.0, (3.0 * t2 * t - 6.0 * t2 + 4.0) / 6.0, (-3.0 * t2 * t + 3.0 * t2 + 3.0 * t + 1.0) / 6.0,
            t2 * t / 6.0)


def _spline_moments(samples: int = 4096) -> tuple[float, float]:
    """Mean over a cell of the sum of squared B-spline weights, and of squared derivatives: the
    variance of a spline field of unit-variance lattice values, and of its slope per cell."""
    t = (np.arange(samples) + 0.5) / samples
    values = sum(w * w for w in _bspline(t)).mean()
    s = 1.0 - t
    slopes = (-s * s / 2.0, 1.5 * t * t - 2.0 * t, -1.5 * t * t + t + 0.5, t * t / 2.0)
    return float(values), float(sum(w * w for w in slopes).mean())


_SPLINE_VARIANCE, _SLOPE_VARIANCE = _spline_moments()
# A 2-D field's variance is the product of both axes' (_SPLINE_VARIANCE**2): values times _SCALE have
# variance 1, and are never beyond _NOISE_BOUND (lattice values are within ±sqrt(3), weights sum to 1).
_SCALE = np.float32(1.0 / _SPLINE_VARIANCE)
_NOISE_BOUND = math.sqrt(3.0) * float(_SCALE)
_UNIT_SLOPE = math.sqrt(_SLOPE_VARIANCE / _SPLINE_VARIANCE)  # a unit-variance field's rms slope per cell

MAX_SUBSAMPLES = 16
"""A level-L pixel's interpolation weights are averaged over this many points per axis at most (all
``2**L`` level-0 pixel centres up to level 4): enough for fields four or more times its width."""


@dataclass(frozen=True)
class _Axis:
    """One axis of a tile against one lattice: dense weights ``(pixels, lattice points)`` averaged over
    each pixel's extent, the first lattice index, which pixels each lattice point reaches, and per
    pixel the mean point variance and the variance after averaging (both per unit lattice variance)."""

    first: int
    weights: np.ndarray
    spans: tuple[tuple[int, int], ...]
    point_variance: np.ndarray
    box_variance: np.ndarray


@functools.lru_cache(maxsize=4096)
def _axis(start: int, count: int, step: int, cell: float) -> _Axis:
    """Weights of lattice points ``k * cell`` (level-0 px) for pixels ``start .. start + count - 1`` of a
    level whose pixels are ``step`` level-0 px wide. Cached, read-only: the tiles of a row share their
    rows' weights, and the rows of tiles their columns' (a few KB each at level 0; tens of MB in all)."""
    subsamples = min(step, MAX_SUBSAMPLES)
    offsets = (np.arange(subsamples) + 0.5) * (step / subsamples)
    positions = ((start + np.arange(count))[:, None] * step + offsets[None, :]) / cell
    base = np.floor(positions).astype(np.int64)
    parts = _bspline(positions - base)
    first = int(base[0, 0]) - 1
    points = int(base[-1, -1]) + 3 - first
    point_variance = sum((part * part).mean(axis=1) for part in parts)
    if subsamples == 1:
        weights = np.zeros((count, points))
        for shift, part in enumerate(parts):
            weights[np.arange(count), base[:, 0] + shift - 1 - first] = part[:, 0]
    else:
        cells = np.repeat(np.arange(count) * points, subsamples)
        weights = sum(np.bincount(cells + (base + shift - 1 - first).ravel(), part.ravel() / subsamples,
                                  minlength=count * points) for shift, part in enumerate(parts)).reshape(count, points)
    # Pixel p reaches lattice points base[p, 0] - 1 .. base[p, -1] + 2; positions grow with p.
    lattice = np.arange(first, first + points)
    low = np.searchsorted(base[:, -1] + 2, lattice, side="left")
    high = np.searchsorted(base[:, 0] - 1, lattice, side="right")
    arrays = [weights.astype(np.float32), point_variance.astype(np.float32),
              (weights * weights).sum(axis=1).astype(np.float32)]
    for array in arrays:
        array.flags.writeable = False
    return _Axis(first, arrays[0], tuple(zip(low.tolist(), high.tolist(), strict=True)), arrays[1], arrays[2])


def _interpolate(lattice: np.ndarray, rows: _Axis, columns: _Axis) -> np.ndarray:
    """The field over the tile, ``rows.weights @ lattice @ columns.weights.T``, by bands of the banded
    weights. Not by BLAS: its threads fight the JPEG encoders' and each other's for these small
    products, which then take twenty times longer (measured)."""
    partial = np.zeros((rows.weights.shape[0], lattice.shape[1]), dtype=np.float32)
    for k, (low, high) in enumerate(rows.spans):
        partial[low:high] += rows.weights[low:high, k, None] * lattice[k]
    out = np.zeros((rows.weights.shape[0], columns.weights.shape[0]), dtype=np.float32)
    for k, (low, high) in enumerate(columns.spans):
        out[:, low:high] += partial[:, k, None] * columns.weights[None, low:high, k]
    return out


@dataclass(frozen=True)
class _Field:
    """A smooth field over a tile: its value (the mean over each pixel) and the variance of the
    level-0 values inside each pixel around it."""

    value: np.ndarray
    residual: np.ndarray | float


class _Tile:
    """One region of one level: pixel centres in level-0 px, and the axes of each lattice used."""

    def __init__(self, level: int, x: int, y: int, width: int, height: int) -> None:
        self.step = 2**level
        self.x, self.y, self.width, self.height = x, y, width, height
        # float32 (exact to 1/200 px at 10**5 px): twice as fast as float64 through every shape below.
        self.xs = ((x + np.arange(width) + 0.5) * self.step).astype(np.float32)
        self.ys = ((y + np.arange(height) + 0.5) * self.step).astype(np.float32)

    def axes(self, cell: float) -> tuple[_Axis, _Axis]:
        return _axis(self.y, self.height, self.step, cell), _axis(self.x, self.width, self.step, cell)

    def noise(self, key: np.uint64, cell: float) -> _Field:
        """Smooth noise of about unit variance whose features are ``cell`` level-0 px across; when the
        pixels are more than four times that, its mean (zero) and all of its variance."""
        if cell * 4 < self.step:
            return _Field(np.zeros((self.height, self.width), np.float32), 1.0)
        rows, columns = self.axes(cell)
        lattice = _lattice(key, rows.first, rows.weights.shape[1], columns.first, columns.weights.shape[1])
        value = _interpolate(lattice, rows, columns) * _SCALE
        residual = (rows.point_variance[:, None] * columns.point_variance[None, :]
                    - rows.box_variance[:, None] * columns.box_variance[None, :]) * (_SCALE * _SCALE)
        return _Field(value, np.maximum(residual, 0.0))

    def geometric(self, cell: float) -> bool:
        """Whether cells ``cell`` level-0 px apart are drawn as shapes (else as their expected coverage)."""
        return self.step * 4 <= cell


def _noise_at(key: np.uint64, cell: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The level-0 value of ``_Tile.noise(key, cell)`` at points (xs, ys) in level-0 px."""
    tx, ty = np.ravel(xs) / cell, np.ravel(ys) / cell
    bx, by = np.floor(tx).astype(np.int64), np.floor(ty).astype(np.int64)
    wx, wy = np.stack(_bspline(tx - bx)), np.stack(_bspline(ty - by))  # (4, points)
    shifts = np.arange(-1, 3)
    # The 4 x 4 lattice values around each point, hashed in one call: (4 rows, 4 columns, points).
    values = (_uniform(key, by[None, None, :] + shifts[:, None, None], bx[None, None, :] + shifts[None, :, None])
              - 0.5) * math.sqrt(12.0)
    total = np.einsum("ip,jp,ijp->p", wy, wx, values)
    return (total * float(_SCALE)).reshape(np.shape(xs))


def _soft_step(z: np.ndarray) -> np.ndarray:
    """About the standard normal CDF (within 0.0002), from tanh: five times cheaper than ``ndtr``."""
    return np.float32(0.5) + np.float32(0.5) * np.tanh(z * (np.float32(0.7978846) + np.float32(0.0356774) * z * z))


def _threshold(field: _Field, threshold: float, slope: float, step: int) -> np.ndarray:
    """The fraction of each pixel where the level-0 field exceeds ``threshold``: anti-aliased over one
    pixel (``slope``: the field's change per level-0 px near the threshold), and spread by the
    variation the pixel averages away."""
    spread = np.sqrt(field.residual + np.float32((0.4 * slope * step) ** 2))
    return _soft_step((field.value - np.float32(threshold)) / spread)


# --------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class _CellKind:
    """Cells drawn as one ellipse per cell of a jittered grid ``spacing`` µm a side. ``shape`` maps
    four uniform arrays to (semi-axis a, semi-axis b, in µm; opacity, 0 for an empty cell). Jitter plus
    the largest semi-axis stays below half the spacing: a shape never leaves its cell, so a pixel only
    looks at the cell it is in."""

    spacing: float
    jitter: float
    shape: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@functools.lru_cache(maxsize=16)
def _mean_coverage(kind: _CellKind) -> np.float32:
    """Expected coverage of a kind of cell: mean area times opacity per cell's area."""
    a, b, opacity = kind.shape(*_quantiles(4, 12))
    return np.float32((math.pi * a * b * opacity).mean() / kind.spacing**2)


def _stroma_cell(kind: np.ndarray, size: np.ndarray, ratio: np.ndarray,
                 darkness: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fibroblasts (pale spindles 4-7 µm long) in 55 % of the cells, lymphocytes (dark dots 2.5-3.5 µm
    across) in 18 %: about one fibroblast per 400 µm² of stroma and one lymphocyte per 1250."""
    fibroblast, lymphocyte = kind < 0.55, (kind >= 0.55) & (kind < 0.73)
    a = np.where(fibroblast, 2.0 + 1.5 * size, 1.25 + 0.5 * size)
    b = a * np.where(fibroblast, 0.3 + 0.15 * ratio, 0.9 + 0.1 * ratio)
    opacity = np.where(fibroblast, (150 + 60 * darkness) / 255, np.where(lymphocyte, (200 + 40 * darkness) / 255, 0.0))
    return a, b, opacity


def _tumour_nucleus(present: np.ndarray, size: np.ndarray, ratio: np.ndarray,
                    darkness: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Large pleomorphic nuclei: lognormal semi-axis around 2.7 µm (sigma 0.22, kept within 1.5-3.3),
    oval, of varying darkness; 8 % of the cells empty."""
    a = np.clip(2.7 * np.exp(0.22 * ndtri(0.02 + 0.96 * size)), 1.5, 3.3)
    return a, a * (0.6 + 0.35 * ratio), np.where(present < 0.92, (190 + 65 * darkness) / 255, 0.0)


def _tumour_lumen(present: np.ndarray, size: np.ndarray, ratio: np.ndarray,
                  _unused: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Small cribriform spaces 7-15 µm across in 80 % of the cells."""
    a = 3.5 + 4.0 * size
    return a, a * (0.5 + 0.5 * ratio), np.where(present < 0.8, 235 / 255, 0.0)


STROMA_CELLS = _CellKind(15.0, 3.5, _stroma_cell)
TUMOUR_NUCLEI = _CellKind(6.25 * math.sqrt(2.0), 1.1, _tumour_nucleus)
"""Two such grids, the second shifted by half a cell: nuclei about 6.25 µm apart, some overlapping."""
TUMOUR_LUMENS = _CellKind(59.0, 18.0, _tumour_lumen)


def _cells(key: np.uint64, tile: _Tile, size: float, count: int,
           derive: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], stagger: bool = False,
           offset: float = 0.0) -> np.ndarray:
    """Per-pixel attributes of the cell of a grid that each pixel centre falls in: cells ``size``
    level-0 px a side starting at ``offset`` (both axes), every other row shifted by half a cell with
    ``stagger``.

    ``derive(uniforms, centre_x, centre_y)`` turns ``count`` uniforms per cell (``(count, rows,
    columns)``) and the cells' centres into a table of attributes ``(K, rows, columns)``, which is
    returned per pixel as ``(K, height, width)``.
    """
    iy = np.floor((tile.ys - offset) / size).astype(np.int64)
    row0, rows = int(iy.min()), int(iy.max() - iy.min()) + 1
    # Columns in half cells with ``stagger``: in a row shifted by half a cell, half-cell h is in cell
    # (h - 1) // 2, else in h // 2.
    ix = np.floor((tile.xs - offset) / (size / 2 if stagger else size)).astype(np.int64)
    column0 = (int(ix.min()) - 1) // 2 if stagger else int(ix.min())
    columns = (int(ix.max()) // 2 if stagger else int(ix.max())) - column0 + 1
    grid_y = np.arange(row0, row0 + rows)[:, None]
    grid_x = np.arange(column0, column0 + columns)[None, :]
    uniforms = _uniform(_keys(int(key), count), grid_y, grid_x)
    shifted = (grid_y % 2) * 0.5 if stagger else 0.0
    centre_x = offset + (grid_x + 0.5 + shifted) * size
    centre_y = offset + (grid_y + 0.5) * size + np.zeros_like(centre_x)
    table = np.asarray(derive(uniforms, centre_x, centre_y), dtype=np.float32)
    if stagger:
        halves = np.arange(int(ix.min()), int(ix.max()) + 1)[None, :]
        table = table[:, np.arange(rows)[:, None], (halves - grid_y % 2) // 2 - column0]
        ix = ix - int(ix.min())
    else:
        ix = ix - column0
    # Rows, then columns: two gathers from small tables, three times faster than one 2-D gather.
    return table[:, iy - row0][:, :, ix]


def _polar(dx: np.ndarray, dy: np.ndarray, cos: np.ndarray,
           sin: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets from a shape's centre along and across its axis (turned by cos, sin), and the distance."""
    return dx * cos + dy * sin, dy * cos - dx * sin, np.sqrt(dx * dx + dy * dy)


def _inside(along: np.ndarray, across: np.ndarray, distance: np.ndarray, inverse_a: np.ndarray | float,
            inverse_b: np.ndarray | float) -> np.ndarray:
    """How far inside an ellipse (inverse semi-axes) a point is, level-0 px along the ray from the centre
    (negative outside): close to the distance to its edge unless the ellipse is very elongated."""
    rho = np.sqrt((along * inverse_a) ** 2 + (across * inverse_b) ** 2)
    return distance / np.maximum(rho, np.float32(1e-6)) - distance


def _coverage(inside: np.ndarray, step: int, radius: np.ndarray | None = None) -> np.ndarray:
    """Coverage of pixels ``step`` level-0 px wide by a shape, ``inside`` its edge, anti-aliased over one
    pixel. With ``radius`` (the shape's geometric mean radius), the area such a ramp adds (``step**2 /
    12`` to a disc's ``r**2``, whatever the convex shape) is taken back: it matters for shapes only a
    few pixels across."""
    coverage = np.clip(np.float32(0.5) + inside * np.float32(1.0 / step), 0.0, 1.0)
    if step > 1 and radius is not None:
        coverage *= radius * radius / (radius * radius + np.float32(step * step / 12.0))
    return coverage


def _strip(offset: np.ndarray, half_width: np.ndarray | float, step: int) -> np.ndarray:
    """Coverage of pixels by a band ``|offset| < half_width`` (level-0 px), anti-aliased over one pixel
    and dimmed when it is narrower than a pixel, so that its area stays ``2 * half_width``."""
    wide = np.maximum(half_width, np.float32(step / 2.0))
    coverage = np.clip(np.float32(0.5) + (wide - np.abs(offset)) * np.float32(1.0 / step), 0.0, 1.0)
    return coverage * (half_width / wide)


def _quantiles(count: int, samples: int) -> list[np.ndarray]:
    """``count`` independent uniforms on a regular grid of ``samples**count`` points: expectations over
    the cells' random attributes, computed with the same formulas that draw them."""
    grid = (np.arange(samples) + 0.5) / samples
    return [axis.ravel() for axis in np.meshgrid(*([grid] * count), indexing="ij")]


# --------------------------------------------------------------------------- the tissue layout


@dataclass(frozen=True)
class TissueLayout:
    """Where the tissue is: a smooth field on a coarse lattice (``cell`` level-0 px apart), tissue
    where it exceeds ``threshold``; ``slope`` is its typical change per level-0 px there."""

    field: np.ndarray
    cell: float
    threshold: float
    slope: float
    fragments: int
    coverage: float


def tissue_layout(rng: np.random.Generator, width: int, height: int) -> TissueLayout:
    """A few tissue fragments on glass, covering 35-55 % of a ``width`` x ``height`` slide.

    Args:
        rng: the slide's generator; the same state gives the same layout.
        width: level 0's width in pixels.
        height: level 0's height in pixels.

    Fragments are 3-6 ellipses, turned a little, one per slot of a grid over the slide (some slots stay
    empty), kept apart by a channel of glass along the line between neighbours, with outlines made
    irregular by two octaves of noise; the threshold is set so that the wanted fraction of the slide
    is tissue. ``fragments`` counts the pieces that result.
    """
    cell = max(width, height) / LAYOUT_CELLS
    columns, rows = math.ceil(width / cell) + 2, math.ceil(height / cell) + 2
    xs = np.arange(columns) * cell
    ys = np.arange(rows)[:, None] * cell
    fragments = int(rng.integers(3, 7))
    slot_columns = max(1, round(math.sqrt(fragments * width / height)))
    slot_rows = math.ceil(fragments / slot_columns)
    slot_width, slot_height = width / slot_columns, height / slot_rows
    first = np.full((rows, columns), -np.inf)  # the highest fragment field at each point, and the next
    second = first.copy()
    for slot in rng.permutation(slot_columns * slot_rows)[:fragments]:
        cx = (slot % slot_columns + 0.5 + rng.uniform(-0.12, 0.12)) * slot_width
        cy = (slot // slot_columns + 0.5 + rng.uniform(-0.12, 0.12)) * slot_height
        radius_x, radius_y = rng.uniform(0.28, 0.42) * slot_width, rng.uniform(0.28, 0.42) * slot_height
        angle = rng.uniform(-0.5, 0.5)  # turned a little: a turned ellipse might leave its slot
        along = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)
        across = (ys - cy) * math.cos(angle) - (xs - cx) * math.sin(angle)
        fragment = 1.0 - np.sqrt((along / radius_x) ** 2 + (across / radius_y) ** 2)
        second = np.maximum(second, np.minimum(first, fragment))
        first = np.maximum(first, fragment)
    # A channel of glass where two fragments' fields are close (between them), so that fragments
    # grown to reach the coverage stay apart.
    field = first - 0.8 * np.clip(1.0 - (first - second) / 0.3, 0.0, 1.0)
    for cells, amplitude in ((10, 0.30), (28, 0.12)):
        grid = (max(3, round(cells * width / max(width, height))), max(3, round(cells * height / max(width, height))))
        field = field + amplitude * smooth_noise(rng, (columns, rows), grid, 1.0)
    # Lowered towards the slide's edge, so that fragments rarely touch it.
    border = np.maximum(np.abs(2 * xs / width - 1), np.abs(2 * ys / height - 1))
    field = (field - 2.0 * np.clip((border - 0.8) / 0.2, 0, None) ** 2).astype(np.float32)
    coverage = float(rng.uniform(0.35, 0.55))
    on_slide = field[: math.ceil(height / cell), : math.ceil(width / cell)]
    threshold = float(np.quantile(on_slide, 1.0 - coverage))
    gradient_y, gradient_x = np.gradient(field)
    near = np.abs(field - threshold) < 0.05
    slope = float(np.hypot(gradient_x, gradient_y)[near].mean() / cell) if near.any() else 1.0 / cell
    pieces = int(ndimage.label(gaussian_blur((on_slide > threshold).astype(np.float32), 0.5) > 0.5)[1])
    return TissueLayout(field, cell, threshold, slope, pieces, coverage)


# --------------------------------------------------------------------------- the slide


@dataclass(frozen=True)
class _Cover:
    """Fractions of a tile's pixels (arrays or constants) that are epithelium, lumen and nuclei, each
    laid over what comes before it (stroma <- epithelium <- lumen <- nuclei)."""

    epithelium: np.ndarray | float
    lumen: np.ndarray | float
    nuclei: np.ndarray | float


def _union(first: np.ndarray | float, second: np.ndarray | float) -> np.ndarray | float:
    return 1.0 - (1.0 - first) * (1.0 - second)


class ProceduralSlide:
    """A synthetic H&E slide of any size whose pixels, at any pyramid level, are rendered on demand.

    ``render`` is thread-safe: it only reads what the constructor fixed (layout, keys, colours).
    """

    def __init__(self, label: str, spec: SlideSpec, stain: Stain, rng: np.random.Generator,
                 cancer_region: Sequence[float] | None = None) -> None:
        """
        Args:
            label: one of ``LABELS``.
            spec: level 0's size and µm/px (tile size and JPEG quality are the writer's business).
            stain: the site's staining (``site_stain``; ``Stain()`` is the reference).
            rng: the only source of randomness: the same state gives the same slide.
            cancer_region: ``(x0, y0, x1, y1)`` as fractions of width and height: adenoma outside,
                adenocarcinoma (always tissue) inside; the label must then be ``"adenocarcinoma"``.
        """
        region = checked_slide(label, cancer_region)
        self.label, self.spec, self.stain = label, spec, stain
        self.layout = tissue_layout(rng, spec.width, spec.height)
        seed = int(rng.integers(0, 2**62))
        self._keys = {name: _key(seed, index) for index, name in enumerate(
            ("edge-0", "edge-1", "fibres", "grain-rows", "grain-columns", "glands", "stroma-cells",
             "nests", "nuclei-0", "nuclei-1", "lumens"))}
        self._px = 1.0 / spec.mpp  # level-0 px per µm
        self._region = None if region is None else (region[0] * spec.width, region[1] * spec.height,
                                                    region[2] * spec.width, region[3] * spec.height)
        self._glass = np.asarray(stain.background, dtype=np.float32)
        # Stroma between two amounts of eosin (mixed linearly in RGB: within half a grey level of
        # Beer-Lambert over so narrow a range), cytoplasm, lumen (nearly empty), nucleus.
        colours = stained(np.array([0.03, 0.03, 0.15, 0.015, 1.45]), np.array([0.22, 0.44, 0.36, 0.036, 0.17]), stain)
        self._stroma_low, self._stroma_high, self._cytoplasm, self._lumen, self._nucleus = colours.astype(np.float32)
        self._gland_mean = self._gland_means()
        self._nest_threshold = float(ndtri(1.0 - CARCINOMA_NEST_COVERAGE))

    def render(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """The pixels of a region of a pyramid level as a ``(height, width, 3)`` uint8 array.

        Args:
            level: 0 for full resolution; level ``L`` is level 0 reduced ``2**L`` times.
            x: left column of the region, in that level's pixels.
            y: top row of the region, in that level's pixels.
            width: the region's width in pixels (it may reach past the slide's edge).
            height: the region's height in pixels.
        """
        if level < 0 or width < 1 or height < 1:
            raise ValueError(f"need level >= 0 and a non-empty region, got level {level}, {width}x{height}")
        tile = _Tile(level, x, y, width, height)
        tissue = self._tissue(tile)
        grain = self._grain(tile)
        region = self._region_share(tile)
        out = np.empty((height, width, 3), dtype=np.uint8)
        if region is None and float(tissue.max()) < _GLASS_ONLY:
            for channel in range(3):  # as below with no tissue, term for term: the same pixels
                out[..., channel] = np.clip(self._glass[channel] + grain + 0.5, 0, 255)
            return out
        cover = self._cover(tile, region)
        if region is not None:
            tissue = tissue + region * (1.0 - tissue)  # the tumour region is all tissue
        stroma = self._stroma(tile)
        grain = grain * (1.0 + np.float32(8.0) * tissue * cover.nuclei)  # chromatin: nuclei are grainier
        for channel in range(3):
            low, high = self._stroma_low[channel], self._stroma_high[channel]
            colour = low + stroma * (high - low)
            colour = colour + cover.epithelium * (self._cytoplasm[channel] - colour)
            colour = colour + cover.lumen * (self._lumen[channel] - colour)
            colour = colour + cover.nuclei * (self._nucleus[channel] - colour)
            glass = self._glass[channel]
            out[..., channel] = np.clip(glass + tissue * (colour - glass) + grain + 0.5, 0, 255)
        return out

    # ------------------------------------------------------------------ fields

    def _tissue(self, tile: _Tile) -> np.ndarray:
        """Tissue coverage of each pixel: the layout plus finer noise on the outline, thresholded."""
        layout = self.layout
        rows, columns = tile.axes(layout.cell)
        index_y = np.clip(np.arange(rows.first, rows.first + rows.weights.shape[1]), 0, layout.field.shape[0] - 1)
        index_x = np.clip(np.arange(columns.first, columns.first + columns.weights.shape[1]), 0,
                          layout.field.shape[1] - 1)
        value = _interpolate(layout.field[np.ix_(index_y, index_x)], rows, columns)
        octaves = [(self._keys[f"edge-{i}"], size_um * self._px, share * size_um * self._px * layout.slope)
                   for i, (size_um, share) in enumerate(EDGE_OCTAVES_UM)]
        # Beyond this, whatever the finer noise, the soft step is 0 or 1 to float32 precision: the same
        # pixels as the full computation, for a quarter of the work.
        amplitudes = [amplitude for _, _, amplitude in octaves]
        reach = _NOISE_BOUND * sum(amplitudes) + 6.0 * math.sqrt(
            sum(a * a for a in amplitudes) + (0.4 * layout.slope * tile.step) ** 2)
        if float(value.max()) < layout.threshold - reach:
            return np.zeros_like(value)  # glass
        if float(value.min()) > layout.threshold + reach:
            return np.ones_like(value)  # well inside a fragment
        residual: np.ndarray | float = 0.0
        for key, cell, amplitude in octaves:
            noise = tile.noise(key, cell)
            value += np.float32(amplitude) * noise.value
            residual = residual + np.float32(amplitude * amplitude) * noise.residual
        tissue = _threshold(_Field(value, residual), layout.threshold, layout.slope, tile.step)
        tissue[tissue < _GLASS_ONLY] = 0.0  # the soft step's tail: glass
        return tissue

    def _stroma(self, tile: _Tile) -> np.ndarray:
        """Where the stroma's eosin lies between its two colours (0..1): wavy collagen bands along the
        contours of a smooth field. A pixel that spans several bands gets their mean."""
        base = tile.noise(self._keys["fibres"], FIBRE_FIELD_UM * self._px)
        # (0.5 + 0.5 sin 9b)^2 = 3/8 + sin(9b)/2 - cos(18b)/8; a Gaussian spread s inside the pixel damps
        # sin(9b) by exp(-81 s^2 / 2) and cos(18b) by exp(-162 s^2).
        spread = base.residual  # per pixel: 0 at level 0, 1 where the field is all averaged away
        damp_sin, damp_cos = np.exp(np.float32(-40.5) * spread), np.exp(np.float32(-162.0) * spread)
        phase = np.float32(9.0) * base.value
        fibres = (np.float32(0.375) + np.float32(0.5) * damp_sin * np.sin(phase)
                  - np.float32(0.125) * damp_cos * np.cos(phase + phase))
        eosin = np.float32(0.28) + np.float32(0.10) * fibres
        return (eosin - np.float32(0.22)) * np.float32(1.0 / 0.22)

    def _grain(self, tile: _Tile) -> np.ndarray:
        """Per-pixel noise, grey levels: the scanner's, and the texture below what the fields draw."""
        rows = _mix(np.arange(tile.y, tile.y + tile.height, dtype=np.int64).astype(np.uint64) * _ROWS
                    ^ self._keys["grain-rows"] ^ np.uint64(tile.step))
        columns = _mix(np.arange(tile.x, tile.x + tile.width, dtype=np.int64).astype(np.uint64) * _COLUMNS
                       ^ self._keys["grain-columns"])
        z = _mix(rows[:, None] ^ columns[None, :])
        uniform = (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
        # Uniform noise of standard deviation GRAIN at level 0; the mean of 4**L pixels has 2**L times less.
        return (uniform - np.float32(0.5)) * np.float32(GRAIN * math.sqrt(12.0) / tile.step)

    # ------------------------------------------------------------------ what the tissue is made of

    def _region_share(self, tile: _Tile) -> np.ndarray | None:
        """The share of each pixel inside the cancer region; None when the tile misses it."""
        if self._region is None:
            return None
        x0, y0, x1, y1 = self._region
        half = tile.step / 2
        share_x = np.clip((np.minimum(tile.xs + half, x1) - np.maximum(tile.xs - half, x0)) / tile.step, 0, 1)
        share_y = np.clip((np.minimum(tile.ys + half, y1) - np.maximum(tile.ys - half, y0)) / tile.step, 0, 1)
        if not (share_x.any() and share_y.any()):
            return None
        return (share_y[:, None] * share_x[None, :]).astype(np.float32)

    def _cover(self, tile: _Tile, region: np.ndarray | None) -> _Cover:
        """What the tissue is made of in each pixel: the label's pattern, or adenoma outside the cancer
        region and adenocarcinoma inside (``region``: each pixel's share in it)."""
        if region is None:  # a slide with a cancer region is adenoma outside it
            return self._adenoma(tile) if self.label == "adenoma" or self._region is not None else self._carcinoma(tile)
        if region.min() == 1.0:
            return self._carcinoma(tile)
        inside, outside = self._carcinoma(tile), self._adenoma(tile)
        # a * r + b * (1 - r): exactly a where r is 1 and b where it is 0, as tiles on either side give.
        pairs = ((inside.epithelium, outside.epithelium), (inside.lumen, outside.lumen),
                 (inside.nuclei, outside.nuclei))
        return _Cover(*(a * region + b * (1.0 - region) for a, b in pairs))

    def _adenoma(self, tile: _Tile) -> _Cover:
        glands = self._glands(tile)
        stroma_nuclei = self._cell_layer(tile, STROMA_CELLS, self._keys["stroma-cells"]) * (1.0 - glands.epithelium)
        return _Cover(glands.epithelium, glands.lumen, _union(glands.nuclei, stroma_nuclei))

    def _carcinoma(self, tile: _Tile) -> _Cover:
        """Nests of tumour cells (three quarters of the tissue) between strands of stroma."""
        nest_cell = CARCINOMA_NEST_UM * self._px
        nests = _threshold(tile.noise(self._keys["nests"], nest_cell), self._nest_threshold,
                           _UNIT_SLOPE / nest_cell, tile.step)
        nuclei: np.ndarray | float = 0.0
        for index in range(2):
            nuclei = _union(nuclei, self._cell_layer(tile, TUMOUR_NUCLEI, self._keys[f"nuclei-{index}"], nests,
                                                     offset=0.5 * index))
        lumens = self._cell_layer(tile, TUMOUR_LUMENS, self._keys["lumens"], nests)
        stroma_nuclei = self._cell_layer(tile, STROMA_CELLS, self._keys["stroma-cells"]) * (1.0 - nests)
        return _Cover(nests, lumens, _union(nuclei, stroma_nuclei))

    def _cell_layer(self, tile: _Tile, kind: _CellKind, key: np.uint64, nests: np.ndarray | None = None,
                    offset: float = 0.0) -> np.ndarray | float:
        """Coverage by one kind of cell, its grid shifted by ``offset`` cells; with ``nests``, only
        cells centred in a tumour nest."""
        spacing, px = kind.spacing * self._px, self._px
        if not tile.geometric(spacing):
            mean = _mean_coverage(kind)
            return mean if nests is None else nests * mean

        def derive(u: np.ndarray, centre_x: np.ndarray, centre_y: np.ndarray) -> np.ndarray:
            x = centre_x + (2 * u[0] - 1) * kind.jitter * px
            y = centre_y + (2 * u[1] - 1) * kind.jitter * px
            a, b, opacity = kind.shape(u[2], u[3], u[4], u[5])
            if nests is not None:  # the same test as the nests' threshold, at the cell's centre
                opacity = opacity * (_noise_at(self._keys["nests"], CARCINOMA_NEST_UM * px, x, y)
                                     > self._nest_threshold)
            angle = np.pi * u[6]
            return np.stack([x, y, np.cos(angle), np.sin(angle), 1 / (a * px), 1 / (b * px), opacity,
                             np.sqrt(a * b) * px])

        x, y, cos, sin, inverse_a, inverse_b, opacity, radius = _cells(key, tile, spacing, 7, derive,
                                                                       offset=offset * spacing)
        along, across, distance = _polar(tile.xs[None, :] - x, tile.ys[:, None] - y, cos, sin)
        return _coverage(_inside(along, across, distance, inverse_a, inverse_b), tile.step, radius) * opacity

    def _gland_shape(self, u: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        """(a, b, wall, nuclei, nucleus half-length in level-0 px; presence) of glands from 4 uniforms:
        round or oval, a ring of cytoplasm 38-46 % of the short radius thick, one row of nuclei 3.5 µm
        apart in it, 7 % of the places empty."""
        a = GLAND_RADIUS_UM * self._px * (0.85 + 0.2 * u[0])
        b = a * (0.6 + 0.4 * u[1])
        wall = b * (0.38 + 0.08 * u[2])
        ring_a, ring_b = a - 0.28 * wall, b - 0.28 * wall
        perimeter = math.pi * (3 * (ring_a + ring_b) - np.sqrt((3 * ring_a + ring_b) * (ring_a + 3 * ring_b)))
        count = np.maximum(8, np.round(perimeter / (RING_NUCLEUS_STEP_UM * self._px)))
        return a, b, wall, count, 0.28 * wall, (u[3] < 0.93).astype(np.float64)

    def _gland_means(self) -> tuple[float, float, float]:
        """The ``_Cover`` of gland-filled tissue on average: what pixels far larger than a gland show."""
        a, b, wall, count, half_length, present = self._gland_shape(_quantiles(4, 16))
        area = (GLAND_SPACING_UM * self._px) ** 2
        outer = (math.pi * a * b * present).mean() / area
        lumen = (math.pi * (a - wall) * (b - wall) * present).mean() / area
        nuclei = (count * math.pi * half_length * RING_NUCLEUS_HALF_WIDTH_UM * self._px * present).mean() / area
        # Each layer of _Cover lies over the ones before it: invert that to get these areas.
        lumen_share = lumen / (1 - nuclei)
        return float((outer - lumen - nuclei) / ((1 - nuclei) * (1 - lumen_share))), float(lumen_share), float(nuclei)

    def _glands(self, tile: _Tile) -> _Cover:
        """Glands on a staggered grid, each wholly inside the tissue layout: a ring of epithelium, a
        row of nuclei in it, a lumen."""
        spacing = GLAND_SPACING_UM * self._px
        if not tile.geometric(spacing):
            return _Cover(*self._gland_mean)
        layout = self.layout
        jitter = 0.1 * GLAND_RADIUS_UM * self._px

        def derive(u: np.ndarray, centre_x: np.ndarray, centre_y: np.ndarray) -> np.ndarray:
            x = centre_x + (2 * u[0] - 1) * jitter
            y = centre_y + (2 * u[1] - 1) * jitter
            a, b, wall, count, half_length, present = self._gland_shape([u[2], u[3], u[4], u[5]])
            # Kept only where the layout is tissue some way beyond the gland's rim.
            inner = ndimage.map_coordinates(layout.field, [y / layout.cell, x / layout.cell], order=3,
                                            mode="nearest", prefilter=False)
            present = present * (inner > layout.threshold + layout.slope * (a + 10 * self._px))
            angle = np.pi * u[6]
            ring_a, ring_b = a - 0.28 * wall, b - 0.28 * wall
            return np.stack([x, y, np.cos(angle), np.sin(angle), 1 / a, 1 / b, 1 / (a - wall), 1 / (b - wall),
                             1 / ring_a, 1 / ring_b, count / (2 * np.pi), u[7], half_length, present])

        (x, y, cos, sin, inverse_a, inverse_b, inverse_inner_a, inverse_inner_b, inverse_ring_a, inverse_ring_b,
         per_radian, phase, half_length, present) = _cells(self._keys["glands"], tile, spacing, 8, derive, stagger=True)
        step = tile.step
        along, across, distance = _polar(tile.xs[None, :] - x, tile.ys[:, None] - y, cos, sin)
        # Glands span many pixels whenever they are drawn: no correction of their area is needed.
        epithelium = _coverage(_inside(along, across, distance, inverse_a, inverse_b), step) * present
        lumen = _coverage(_inside(along, across, distance, inverse_inner_a, inverse_inner_b), step) * present
        # Nuclei: a band across the ring's mid-line, cut along it into nuclei 3.5 µm apart.
        offset = _inside(along, across, distance, inverse_ring_a, inverse_ring_b)
        band = _strip(offset, half_length, step)
        nucleus_step = RING_NUCLEUS_STEP_UM * self._px
        half_width = RING_NUCLEUS_HALF_WIDTH_UM * self._px
        if tile.geometric(nucleus_step):
            turns = np.arctan2(across * inverse_ring_b, along * inverse_ring_a) * per_radian + phase
            tangential = (turns - np.floor(turns) - np.float32(0.5)) * np.float32(nucleus_step)
            # Each nucleus an ellipse: as wide as the band allows at this offset from its mid-line.
            width = np.float32(half_width) * np.sqrt(np.clip(1.0 - (offset / half_length) ** 2, 0.0, 1.0))
            nuclei = band * _strip(tangential, np.maximum(width, np.float32(1e-3)), step)
        else:
            nuclei = band * np.float32(math.pi * half_width / (2 * nucleus_step))
        return _Cover(epithelium, lumen, nuclei * present)
