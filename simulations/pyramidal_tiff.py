"""A pyramidal, JPEG-tiled TIFF that OpenSlide opens with several levels and a µm/px: from an RGB array
(``write_pyramid_tiff``), or streamed from tiles rendered on demand, for slides too large for memory
(``write_pyramid_tiff_tiles``).

OpenSlide's generic-TIFF reader (4.0) finds the levels only in one layout: level 0 tiled, and each
reduced level a further tiled page of the main page chain with ``NewSubfileType = 1`` (reduced
image); levels as SubIFDs, or without the flag, open as one level, silently, and a stripped TIFF is
refused. It reports ``openslide.mpp-x``/``mpp-y`` from level 0's ``XResolution``/``YResolution``
when ``ResolutionUnit`` is centimeter (``mpp = 10000 / XResolution``) or inch (``25400 /
XResolution``); with unit none, tifffile's default, it reports no µm/px. So levels are written as
pages, and resolutions in pixels per centimeter. JPEG tiles need the ``imagecodecs`` package.
(``docs/library-notes.md``.)
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from PIL import Image

from shared.atomic_files import atomic_write
from shared.memory import keep_freed_memory

MIN_LEVEL_SIZE = 512
"""Reduced levels are added until the long side is at most this many pixels."""

RenderTile = Callable[[int, int, int, int, int], np.ndarray]
"""``render_tile(level, x, y, width, height)``: the ``(height, width, 3)`` uint8 pixels of a region of a
level, ``x`` and ``y`` in that level's pixels."""

TILE_WORKERS = max(1, min(8, os.cpu_count() or 1))
"""Processes rendering and compressing tiles for ``write_pyramid_tiff_tiles`` by default."""


def level_sizes(width: int, height: int) -> list[tuple[int, int]]:
    """(width, height) of each level: level 0, then halved (rounded up, as ``Image.reduce`` does) until
    the long side is at most ``MIN_LEVEL_SIZE`` or the short side would drop below 16."""
    sizes = [(width, height)]
    while max(sizes[-1]) > MIN_LEVEL_SIZE and min(sizes[-1]) >= 32:
        last_width, last_height = sizes[-1]
        sizes.append(((last_width + 1) // 2, (last_height + 1) // 2))
    return sizes


def write_pyramid_tiff(path: Path, rgb: np.ndarray, mpp: float, tile: int = 256, quality: int = 90,
                       description: str | None = None) -> None:
    """Write ``rgb`` as a pyramidal JPEG-tiled TIFF, atomically (``shared/atomic_files.py``). For arrays
    that fit in memory; ``write_pyramid_tiff_tiles`` streams slides of any size.

    Args:
        path: the TIFF to write; its folder is created.
        rgb: level 0, a ``(height, width, 3)`` uint8 array.
        mpp: µm per pixel of level 0; level ``i`` gets ``mpp * 2**i``.
        tile: tile side in pixels (a multiple of 16).
        quality: JPEG quality, 1-100.
        description: level 0's ImageDescription (OpenSlide's ``tiff.ImageDescription``).
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be an (height, width, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    _check_options(mpp, tile, quality)
    sizes = level_sizes(rgb.shape[1], rgb.shape[0])

    def levels() -> Iterator[np.ndarray]:
        # Each level reduced from the one before, one at a time.
        image = Image.fromarray(rgb)
        yield np.ascontiguousarray(rgb)
        for _ in sizes[1:]:
            image = image.reduce(2)
            yield np.asarray(image)

    _write_levels(Path(path), sizes, levels(), mpp, tile, quality, description)


def write_pyramid_tiff_tiles(path: Path, width: int, height: int, mpp: float, render_tile: RenderTile,
                             tile: int = 256, quality: int = 90, description: str | None = None,
                             workers: int | None = None,
                             progress: Callable[[int, int], None] | None = None) -> int:
    """Write a pyramidal JPEG-tiled TIFF whose pixels ``render_tile`` gives tile by tile: memory does not
    grow with the slide, which goes straight to a temporary file beside ``path`` and is renamed into
    place when complete (``shared/atomic_files.py``). Returns the number of levels.

    Args:
        path: the TIFF to write; its folder is created.
        width: level 0's width in pixels.
        height: level 0's height in pixels.
        mpp: µm per pixel of level 0; level ``i`` gets ``mpp * 2**i``.
        render_tile: ``render_tile(level, x, y, w, h)``, the ``(h, w, 3)`` uint8 pixels of any region of
            any level (levels as ``level_sizes``: level ``i`` is level 0 reduced ``2**i`` times). Called
            for every tile of every level; with ``workers`` above 1 in other processes, so it must
            pickle (a module-level function, or a method of a picklable object).
        tile: tile side in pixels (a multiple of 16).
        quality: JPEG quality, 1-100.
        description: level 0's ImageDescription (OpenSlide's ``tiff.ImageDescription``).
        workers: processes rendering and compressing tiles (default ``TILE_WORKERS``); 1: this process.
            The bytes written are the same whatever the number.
        progress: called as ``progress(tiles_done, tiles_total)`` after every tile.
    """
    if width < 1 or height < 1:
        raise ValueError(f"the slide must be at least 1x1 px, got {width}x{height}")
    _check_options(mpp, tile, quality)
    sizes = level_sizes(width, height)
    total = sum(-(-level_width // tile) * -(-level_height // tile) for level_width, level_height in sizes)
    with _TileEncoder(render_tile, tile, quality, TILE_WORKERS if workers is None else workers) as encoder:
        done = 0

        def counted(tiles: Iterator[bytes]) -> Iterator[bytes]:
            nonlocal done
            for encoded in tiles:
                done += 1  # before handing it on: tifffile asks for no tile past a level's last
                if progress is not None:
                    progress(done, total)
                yield encoded

        pages = (counted(encoder.tiles(level, level_width, level_height))
                 for level, (level_width, level_height) in enumerate(sizes))
        _write_levels(Path(path), sizes, pages, mpp, tile, quality, description)
    return len(sizes)


def _check_options(mpp: float, tile: int, quality: int) -> None:
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if tile <= 0 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")


JPEG_SUBSAMPLING = (2, 2)
"""Chroma subsampling of the JPEG tiles (tifffile's default for RGB, stated so that tiles compressed
here carry the tags that describe them)."""


def _write_levels(path: Path, sizes: list[tuple[int, int]], levels: Iterable[np.ndarray | Iterator[bytes]],
                  mpp: float, tile: int, quality: int, description: str | None) -> None:
    """The one place that writes the layout OpenSlide needs (this module's docstring): each level a
    page of the main chain, tiled, JPEG, reduced levels flagged, resolution in pixels per centimeter.
    ``levels`` gives each level as an array, or as its tiles in row-major order already compressed
    by ``_encode_tile``."""
    # Classic TIFF addresses 4 GB: more than enough unless the raw pixels pass 2 GB (JPEG keeps well
    # under half of them), when the file is BigTIFF, which OpenSlide reads as well.
    bigtiff = sum(width * height * 3 for width, height in sizes) > 2**31

    def write(handle) -> None:
        # tifffile wants a named file; a temporary file's handle is named by its descriptor.
        with tifffile.TiffWriter(tifffile.FileHandle(handle, name=path.name), bigtiff=bigtiff) as writer:
            for index, ((width, height), data) in enumerate(zip(sizes, levels, strict=True)):
                pixels_per_cm = 1e4 / (mpp * 2**index)
                writer.write(data, shape=(height, width, 3), dtype=np.uint8, photometric="rgb", tile=(tile, tile),
                             compression="jpeg", compressionargs={"level": int(quality)},
                             subsampling=JPEG_SUBSAMPLING, resolution=(pixels_per_cm, pixels_per_cm),
                             resolutionunit="CENTIMETER", subfiletype=0 if index == 0 else 1,
                             description=description if index == 0 else None, metadata=None,
                             software="fedpath.simulations.slide_generator")

    atomic_write(path, write)


def _encode_tile(pixels: np.ndarray, quality: int) -> bytes:
    """A full ``(tile, tile, 3)`` RGB tile as tifffile compresses one for ``_write_levels`` (YCbCr,
    ``JPEG_SUBSAMPLING``): the same bytes, checked by a test, so tiles can be compressed anywhere."""
    return imagecodecs.jpeg_encode(pixels, level=int(quality), colorspace="RGB", outcolorspace="YCBCR",
                                   subsampling=JPEG_SUBSAMPLING)


def _padded(pixels: np.ndarray, width: int, height: int, tile: int) -> np.ndarray:
    """A region as a full tile, its last row and column repeated: JPEG rings at a hard edge."""
    if pixels.shape != (height, width, 3) or pixels.dtype != np.uint8:
        raise ValueError(f"render_tile must return a ({height}, {width}, 3) uint8 array, got {pixels.shape} "
                         f"{pixels.dtype}")
    if width == tile and height == tile:
        return pixels
    return np.pad(pixels, ((0, tile - height), (0, tile - width), (0, 0)), mode="edge")


def _rendered_tile(render_tile: RenderTile, level: int, x: int, y: int, width: int, height: int, tile: int,
                   quality: int) -> bytes:
    return _encode_tile(_padded(render_tile(level, x, y, width, height), width, height, tile), quality)


# Worker processes render and compress tiles: the renderers are numpy-heavy Python, which threads
# would serialise on the GIL, and compressed tiles are a tenth of the pixels to send back. Workers
# are spawned, not forked: a fork would copy whatever locks the parent's threads hold.

_WORKER_RENDER: RenderTile | None = None


def _install(render_tile: RenderTile) -> None:
    global _WORKER_RENDER
    _WORKER_RENDER = render_tile
    keep_freed_memory()  # worker processes: they are ours


def _tile_in_worker(level: int, x: int, y: int, width: int, height: int, tile: int, quality: int) -> bytes:
    assert _WORKER_RENDER is not None, "worker started without a renderer"
    return _rendered_tile(_WORKER_RENDER, level, x, y, width, height, tile, quality)


class _TileEncoder:
    """The compressed tiles of a level in row-major order, made here or by a pool of processes with a
    few tiles in flight (what is held stays small whatever the slide)."""

    def __init__(self, render_tile: RenderTile, tile: int, quality: int, workers: int) -> None:
        self._render, self._tile, self._quality = render_tile, tile, quality
        self._workers = max(1, int(workers))
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _TileEncoder:
        if self._workers > 1:
            self._pool = ProcessPoolExecutor(self._workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_install, initargs=(self._render,))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def tiles(self, level: int, width: int, height: int) -> Iterator[bytes]:
        tile = self._tile
        regions = ((x, y, min(tile, width - x), min(tile, height - y))
                   for y in range(0, height, tile) for x in range(0, width, tile))
        if self._pool is None:
            for region in regions:
                yield _rendered_tile(self._render, level, *region, tile, self._quality)
            return
        pending: deque[Future[bytes]] = deque()
        for region in regions:
            pending.append(self._pool.submit(_tile_in_worker, level, *region, tile, self._quality))
            if len(pending) >= 4 * self._workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
