"""Per-tile values drawn over a slide's thumbnail, the picture a pathologist looks at.

Two pictures. The overlay has exactly the thumbnail's pixel size, so the two images can be flipped
or overlaid in any viewer. The figure shows the overlay with what is needed to read it on its own
(printed, pasted in a report): a title and a colour bar in the values' units. Colours are diverging
and centred on zero: red tiles raise the explained class's probability, blue ones lower it, tiles
near zero get a faint veil (they were scored), and areas without a tile show the plain thumbnail.
How opaque the strongest tiles are is a setting: tissue under a strong colour is hard to judge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg  # renders to memory: no GUI, no global backend
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from shared.atomic_files import atomic_write

COLORMAP = "coolwarm"
MAX_ALPHA = 0.75  # default opacity of the strongest tiles: they still let the tissue show through
DPI = 100
MARGIN_PX = (200, 100)  # room beside and above the image for the colour bar and the title
MIN_FIGURE_PX = (640, 480)  # a small thumbnail is shown larger, so that title and bar labels still fit


def _relative(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Values over their largest magnitude (the slide's own ranking) and that magnitude; all zero stays zero."""
    values = np.asarray(values, dtype=np.float64)
    peak = float(np.abs(values).max()) if len(values) else 0.0
    return (values / peak if peak > 0 else np.zeros_like(values)), peak


def render_heatmap(thumb: np.ndarray, scale: tuple[float, float], coords: np.ndarray, footprint: int,
                   values: np.ndarray, alpha: float = MAX_ALPHA) -> np.ndarray:
    """The thumbnail (H x W x 3 uint8) with each tile tinted by its value.

    ``scale`` is level-0 pixels per thumbnail pixel (x, y); ``coords`` the tiles' level-0 top-left
    corners; ``footprint`` their level-0 side. Values are scaled by the largest magnitude, so the
    colours show the slide's own ranking; a slide whose values are all zero stays untinted.
    ``alpha`` (0 to 1) is the opacity of the strongest tiles; weaker ones fade to a quarter of it,
    and 0 leaves the thumbnail as it is.
    """
    height, width = thumb.shape[:2]
    relative, _ = _relative(values)
    colours = colormaps[COLORMAP]((relative + 1) / 2)[:, :3] * 255
    tint = np.zeros((height, width, 3))
    opacity = np.zeros((height, width, 1))
    sx, sy = scale
    for (x, y), colour, strength in zip(np.asarray(coords), colours, np.abs(relative), strict=True):
        x0, y0 = int(round(x / sx)), int(round(y / sy))
        x1, y1 = max(x0 + 1, int(round((x + footprint) / sx))), max(y0 + 1, int(round((y + footprint) / sy)))
        tint[y0:y1, x0:x1] = colour
        opacity[y0:y1, x0:x1] = alpha * (0.25 + 0.75 * strength)
    blended = thumb * (1 - opacity) + tint * opacity
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def heatmap_figure(overlay: np.ndarray, values: np.ndarray, title: str, label: str) -> Figure:
    """The overlay (from ``render_heatmap``) under ``title``, with a colour bar labelled ``label``.

    The bar spans minus to plus the largest magnitude of ``values``, the range the overlay's colours
    were scaled to, so a colour reads as a value in the values' own units.
    """
    _, peak = _relative(values)
    limit = peak if peak > 0 else 1.0  # nothing is tinted: any symmetric range says so
    height, width = overlay.shape[:2]
    size = [max(side + margin, least) / DPI
            for side, margin, least in zip((width, height), MARGIN_PX, MIN_FIGURE_PX, strict=True)]
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title)  # over the whole figure: the layout keeps it inside, an axes title may overhang
    axes = figure.add_subplot()
    axes.imshow(overlay)
    axes.set_axis_off()
    bar = figure.colorbar(ScalarMappable(Normalize(-limit, limit), COLORMAP), ax=axes, shrink=0.8)
    bar.set_label(label)
    return figure


def write_png(path: Path, rgb: np.ndarray) -> None:
    atomic_write(path, lambda handle: Image.fromarray(rgb).save(handle, format="PNG"))


def write_figure(path: Path, figure: Figure) -> None:
    atomic_write(path, lambda handle: figure.savefig(handle, format="png"))
