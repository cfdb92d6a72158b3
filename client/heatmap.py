"""Per-tile values drawn over a slide's thumbnail, the picture a pathologist looks at.

The heatmap has exactly the thumbnail's pixel size, so the two images can be flipped or
overlaid in any viewer. Colours are diverging and centred on zero: red tiles raise the
explained class's probability, blue ones lower it, tiles near zero get a faint grey veil (they were
scored), and areas without a tile show the plain thumbnail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps  # the colour map alone: no figure, no backend
from PIL import Image

from shared.atomic_files import atomic_write

COLORMAP = "coolwarm"
MAX_ALPHA = 0.75  # strongest tiles still let the tissue show through


def render_heatmap(thumb: np.ndarray, scale: tuple[float, float], coords: np.ndarray, footprint: int,
                   values: np.ndarray) -> np.ndarray:
    """The thumbnail (H x W x 3 uint8) with each tile tinted by its value.

    ``scale`` is level-0 pixels per thumbnail pixel (x, y); ``coords`` the tiles' level-0 top-left
    corners; ``footprint`` their level-0 side. Values are scaled by the largest magnitude, so the
    colours show the slide's own ranking; a slide whose values are all zero stays untinted.
    """
    height, width = thumb.shape[:2]
    values = np.asarray(values, dtype=np.float64)
    peak = float(np.abs(values).max()) if len(values) else 0.0
    relative = values / peak if peak > 0 else np.zeros_like(values)
    colours = colormaps[COLORMAP]((relative + 1) / 2)[:, :3] * 255
    tint = np.zeros((height, width, 3))
    alpha = np.zeros((height, width, 1))
    sx, sy = scale
    for (x, y), colour, strength in zip(np.asarray(coords), colours, np.abs(relative), strict=True):
        x0, y0 = int(round(x / sx)), int(round(y / sy))
        x1, y1 = max(x0 + 1, int(round((x + footprint) / sx))), max(y0 + 1, int(round((y + footprint) / sy)))
        tint[y0:y1, x0:x1] = colour
        alpha[y0:y1, x0:x1] = MAX_ALPHA * (0.25 + 0.75 * strength)
    blended = thumb * (1 - alpha) + tint * alpha
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> None:
    atomic_write(path, lambda handle: Image.fromarray(rgb).save(handle, format="PNG"))
