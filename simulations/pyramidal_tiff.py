"""An RGB array as a pyramidal, JPEG-tiled TIFF that OpenSlide opens with several levels and a µm/px.

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

import io
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from shared.atomic_files import atomic_write_bytes

MIN_LEVEL_SIZE = 512
"""Reduced levels are added until the long side is at most this many pixels."""


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
    """Write ``rgb`` as a pyramidal JPEG-tiled TIFF, atomically (``shared/atomic_files.py``).

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
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    levels = [np.ascontiguousarray(rgb)]
    image = Image.fromarray(rgb)
    for _ in level_sizes(rgb.shape[1], rgb.shape[0])[1:]:
        image = image.reduce(2)
        levels.append(np.asarray(image))

    encoded = io.BytesIO()  # tifffile needs a named file or an in-memory one: a temporary file's handle is neither
    with tifffile.TiffWriter(encoded, bigtiff=rgb.nbytes > 2**31) as writer:
        for index, level in enumerate(levels):
            pixels_per_cm = 1e4 / (mpp * 2**index)
            writer.write(level, photometric="rgb", tile=(tile, tile), compression="jpeg",
                         compressionargs={"level": int(quality)}, resolution=(pixels_per_cm, pixels_per_cm),
                         resolutionunit="CENTIMETER", subfiletype=0 if index == 0 else 1,
                         description=description if index == 0 else None, metadata=None,
                         software="fedpath.simulations.slide_generator")
    atomic_write_bytes(Path(path), encoded.getbuffer())
