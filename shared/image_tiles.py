"""Reading one tile of a folder of image tiles (PNG, JPEG, TIFF files), as a fixed-size RGB array.

Both sides read such folders: a site whose data are tiles rather than slides (``data.tile_folder``,
``client/tile_datasets.py``), and the server when it pretrains the trunk's projection on public tiles
(``server/encoder_pretraining.py``). One function, so that both resize the same way and a tile the
site reads is the tile the server trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


def read_image_tile(path: Path, size: int) -> np.ndarray:
    """``path`` as uint8 RGB of ``size`` x ``size`` pixels (bilinear when its size differs).

    Args:
        path: an image file PIL reads (PNG, JPEG, TIFF).
        size: the tile side in pixels.

    Raises:
        ValueError: the file cannot be read as an image; the message says why (each caller names the file
            in its own error type).
    """
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"cannot read image tile: {exc}") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return np.asarray(rgb)
