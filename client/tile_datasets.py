"""From an item to tiles: plan the tiles of a slide or tile group, and read their pixels.

Planning (thumbnail, tissue mask, grid) happens once per item in the main process. Reading is a
dataset by index (``__len__``, ``__getitem__``), picklable and free of torch, so reader processes
(``client/tile_reader.py``) decode tiles in parallel with the feature extractor; each reader opens its
own OpenSlide handle, as handles are not shareable across processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from client.slides import ReadPlan, SlideError, open_slide, plan_for_slide, read_tile, thumbnail
from client.sources import Item
from client.tile_reader import Tiles
from client.tiling import TileGrid, tile_grid
from client.tissue import tissue_mask
from shared.image_tiles import read_image_tile

if TYPE_CHECKING:  # a reader process imports this module: site_config would bring torch with it
    from client.site_config import TilingConfig


@dataclass(frozen=True)
class TilePlan:
    grid: TileGrid
    read: ReadPlan | None  # None for image tiles, which are read whole
    dimensions: tuple[int, int]  # level-0 width, height of the slide (tile size for image tiles)


# Mask pixels across one tile: enough to judge its tissue fraction, few enough to be cheap.
MASK_PX_PER_TILE = 16


def mask_side(dimensions: tuple[int, int], footprint: int, limit: int) -> int:
    """Longest side of the mask thumbnail: MASK_PX_PER_TILE per tile, at most ``limit``."""
    return max(64, min(limit, -(-max(dimensions) * MASK_PX_PER_TILE // footprint)))


def plan_slide(path: Path, tiling: TilingConfig, mpp_override: float | None) -> TilePlan:
    slide = open_slide(path)
    try:
        try:
            read = plan_for_slide(slide, tiling.target_mpp, tiling.tile_size, mpp_override)
        except ValueError as exc:
            raise SlideError(path, str(exc)) from None
        thumb, scale = thumbnail(slide, mask_side(slide.dimensions, read.footprint, tiling.mask_size))
        grid = tile_grid(tissue_mask(thumb), scale, slide.dimensions, read.footprint, tiling.min_tissue)
        return TilePlan(grid, read, slide.dimensions)
    finally:
        slide.close()


def plan_tiles(files: tuple[Path, ...], tile_size: int) -> TilePlan:
    """Image tiles in a row: tile i sits in grid cell (i, 0)."""
    cells = np.stack([np.arange(len(files)), np.zeros(len(files), dtype=np.int64)], axis=1).astype(np.int64)
    grid = TileGrid(cells * tile_size, cells, np.ones(len(files), dtype=np.float32))
    return TilePlan(grid, None, (tile_size, tile_size))


def plan_item(item: Item, tiling: TilingConfig, mpp_override: float | None = None) -> TilePlan:
    if item.kind == "slide":
        return plan_slide(item.files[0], tiling, mpp_override)
    return plan_tiles(item.files, tiling.tile_size)


class SlideTiles:
    """Pixels of the planned tiles of one slide, read on demand."""

    def __init__(self, path: Path, coords: np.ndarray, read: ReadPlan):
        self.path = path
        self.coords = coords
        self.read = read
        self._slide = None  # opened lazily, once per worker process

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, index: int) -> np.ndarray:
        if self._slide is None:
            self._slide = open_slide(self.path)
        x, y = self.coords[index]
        return read_tile(self._slide, x, y, self.read)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slide": None}


class ImageTiles:
    """Image files of a tile dataset, resized to the tile size."""

    def __init__(self, files: tuple[Path, ...], tile_size: int):
        self.files = files
        self.tile_size = tile_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray:
        path = self.files[index]
        try:
            return read_image_tile(path, self.tile_size)
        except ValueError as exc:
            raise SlideError(path, str(exc)) from None


class TimedTiles:
    """A tile dataset that adds up the seconds spent reading tiles in this process (``predict``'s
    read/trunk split). Here, not in ``client/predict.py``: a reader process unpickles it, and
    importing ``client.predict`` would bring torch into the reader (0.75 GB measured)."""

    def __init__(self, tiles: Tiles):
        self.tiles = tiles
        self.seconds = 0.0

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> np.ndarray:
        start = time.perf_counter()
        tile = self.tiles[index]
        self.seconds += time.perf_counter() - start
        return tile


class TileTransform(Protocol):
    """A pixel transform applied to every tile before the encoder (a simulated site's stain)."""

    def __call__(self, tile: np.ndarray) -> np.ndarray: ...

    def cache_settings(self) -> dict: ...  # its parameters: they change the vectors, so the cache key


class TransformedTiles:
    def __init__(self, tiles: Tiles, transform: TileTransform):
        self.tiles, self.transform = tiles, transform

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.transform(self.tiles[index])


def tile_dataset(item: Item, plan: TilePlan, tile_size: int, transform: TileTransform | None = None) -> Tiles:
    tiles = SlideTiles(item.files[0], plan.grid.coords, plan.read) if item.kind == "slide" \
        else ImageTiles(item.files, tile_size)
    return tiles if transform is None else TransformedTiles(tiles, transform)
