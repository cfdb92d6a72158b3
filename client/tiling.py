"""The tile grid of a slide: which tiles hold enough tissue, in an order that keeps neighbours together.

Tiles are kept as level-0 coordinates only; pixels are read when a tile is needed. The order is
a Hilbert curve over the grid, so any run of consecutive tiles is a compact patch of tissue and
a sequence model sees neighbouring tiles next to each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TileGrid:
    coords: np.ndarray  # (N, 2) int64 level-0 x, y of each tile's top-left corner
    cells: np.ndarray  # (N, 2) int64 grid column, row
    tissue: np.ndarray  # (N,) float32 tissue fraction under each tile

    def __len__(self) -> int:
        return len(self.coords)


def tissue_fractions(mask: np.ndarray, mask_scale: tuple[float, float], footprint: int,
                     columns: int, rows: int) -> np.ndarray:
    """Tissue fraction of every grid cell (rows x columns), from a mask at thumbnail scale."""
    height, width = mask.shape
    # Integral image: each cell's tissue sum is four look-ups, whatever the cell size.
    integral = np.zeros((height + 1, width + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.int64), axis=1)
    sx, sy = mask_scale
    x_edges = np.clip(np.rint(np.arange(columns + 1) * footprint / sx).astype(np.int64), 0, width)
    y_edges = np.clip(np.rint(np.arange(rows + 1) * footprint / sy).astype(np.int64), 0, height)
    x0, x1 = x_edges[:-1], x_edges[1:]
    y0, y1 = y_edges[:-1, None], y_edges[1:, None]
    sums = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    areas = (y1 - y0) * (x1 - x0)
    return np.where(areas > 0, sums / np.maximum(areas, 1), 0.0).astype(np.float32)


def hilbert_index(x: np.ndarray, y: np.ndarray, order: int) -> np.ndarray:
    """Position of cells (x, y) along a Hilbert curve filling a 2**order square (vectorised)."""
    x = x.astype(np.int64).copy()
    y = y.astype(np.int64).copy()
    index = np.zeros_like(x)
    side = 1 << order
    s = side >> 1
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        index += s * s * ((3 * rx) ^ ry)
        # Rotate the quadrant so the curve stays continuous.
        flip = ~ry & rx
        x = np.where(flip, side - 1 - x, x)
        y = np.where(flip, side - 1 - y, y)
        swap = ~ry
        x, y = np.where(swap, y, x), np.where(swap, x, y)
        s >>= 1
    return index


def spatial_order(cells: np.ndarray) -> np.ndarray:
    """Indices that sort grid cells along a Hilbert curve (neighbours stay neighbours)."""
    if len(cells) == 0:
        return np.zeros(0, dtype=np.int64)
    order = max(1, int(np.ceil(np.log2(max(int(cells.max()) + 1, 2)))))
    return np.argsort(hilbert_index(cells[:, 0], cells[:, 1], order), kind="stable")


def tile_grid(mask: np.ndarray, mask_scale: tuple[float, float], dimensions: tuple[int, int],
              footprint: int, min_tissue: float) -> TileGrid:
    """Tiles of ``footprint`` level-0 pixels whose tissue fraction is at least ``min_tissue``.

    Only whole tiles inside the slide are kept, in Hilbert order.
    """
    width, height = dimensions
    columns, rows = width // footprint, height // footprint
    if columns == 0 or rows == 0:
        empty = np.zeros((0, 2), dtype=np.int64)
        return TileGrid(empty, empty.copy(), np.zeros(0, dtype=np.float32))
    fractions = tissue_fractions(mask, mask_scale, footprint, columns, rows)
    row_idx, col_idx = np.nonzero(fractions >= min_tissue)
    cells = np.stack([col_idx, row_idx], axis=1).astype(np.int64)
    order = spatial_order(cells)
    cells = cells[order]
    return TileGrid(cells * footprint, cells, fractions[cells[:, 1], cells[:, 0]])
