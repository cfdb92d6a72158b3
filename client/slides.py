"""Opening whole-slide images and planning how to read tiles at a target resolution.

OpenSlide reads every format a hospital scanner writes (SVS, NDPI, MRXS, SCN, DICOM WSI, tiled
TIFF). Slides differ in base resolution and pyramid levels, so a tile of ``tile_size`` pixels at
``target_mpp`` µm/px is read from the coarsest level that is still at least as fine as the
target, then resized: the least pixels decoded for the same tissue.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import openslide
from PIL import Image

from shared.errors import UserError

# Objective power to µm/px, the scanner convention: 20x is about 0.5 µm/px, 40x about 0.25.
MPP_AT_1X = 10.0
# A level counts as "fine enough" when its µm/px is within this factor of the target.
LEVEL_TOLERANCE = 1.01


class SlideError(UserError):
    """A slide that cannot be used, with the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(path, reason)  # both in args, so it survives pickling from reader processes
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def failure_reason(exc: Exception) -> str:
    """One line saying why an item failed, without repeating its path."""
    if isinstance(exc, SlideError):
        return exc.reason
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__


def series_file(folder: Path) -> Path:
    """The file OpenSlide opens for a DICOM WSI series kept in ``folder`` (one series per folder, as
    PACS exports and converters write them): the first file, by name, that OpenSlide detects as DICOM.
    OpenSlide finds the series' other instances (the pyramid's levels, label, overview) beside it."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for candidate in files:
        try:
            if openslide.OpenSlide.detect_format(str(candidate)) == "dicom":
                return candidate
        except OSError:
            continue
    raise SlideError(folder, f"a folder, and none of its {len(files)} file{'' if len(files) == 1 else 's'} is a DICOM "
                             "whole-slide image OpenSlide can read (name a slide file, or the folder of one DICOM "
                             "WSI series)")


def open_slide(path: Path | str) -> openslide.OpenSlide:
    """Open a whole-slide image (a file, or a DICOM WSI series' folder), turning OpenSlide's failures
    into a SlideError that says why."""
    path = Path(path)
    if not path.exists():
        raise SlideError(path, "file not found")
    try:
        return openslide.OpenSlide(str(series_file(path) if path.is_dir() else path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(path, "not a whole-slide image OpenSlide can read (unsupported or corrupt file)") from None
    except openslide.OpenSlideError as exc:
        raise SlideError(path, f"OpenSlide could not read it: {exc}") from None
    except OSError as exc:
        raise SlideError(path, f"cannot open: {exc}") from None


def base_mpp(properties: Mapping[str, str], override: float | None = None) -> tuple[float, str]:
    """Level-0 µm/px and where it came from: the slide's mpp, its objective power, or the override."""
    try:
        mpp_x = float(properties[openslide.PROPERTY_NAME_MPP_X])
        mpp_y = float(properties.get(openslide.PROPERTY_NAME_MPP_Y, mpp_x))
        if mpp_x > 0 and mpp_y > 0:
            return (mpp_x + mpp_y) / 2, "mpp"
    except (KeyError, ValueError):
        pass
    try:
        power = float(properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER])
        if power > 0:
            return MPP_AT_1X / power, "objective-power"
    except (KeyError, ValueError):
        pass
    if override is not None:
        return override, "override"
    raise ValueError(
        "the slide records neither µm/px nor objective power; "
        "set data.mpp_override in site.yaml to this scanner's µm/px"
    )


@dataclass(frozen=True)
class ReadPlan:
    """How to read one tile: at which level, how many pixels there, how much slide it covers."""

    level: int
    read_size: int  # pixels read at `level` for one tile
    tile_size: int  # pixels of the tile handed to the model
    footprint: int  # level-0 pixels one tile spans (the grid step)
    base_mpp: float
    mpp_source: str

    @property
    def needs_resize(self) -> bool:
        return self.read_size != self.tile_size


def plan_read(level_downsamples: Sequence[float], mpp: float, target_mpp: float, tile_size: int,
              mpp_source: str = "mpp") -> ReadPlan:
    """Choose the pyramid level for tiles of ``tile_size`` px at ``target_mpp`` (pure)."""
    wanted = target_mpp / mpp  # level-0 pixels per output pixel
    usable = [i for i, ds in enumerate(level_downsamples) if ds <= wanted * LEVEL_TOLERANCE]
    level = max(usable, key=lambda i: level_downsamples[i]) if usable else 0
    scale = wanted / level_downsamples[level]
    read_size = max(1, round(tile_size * scale))
    footprint = max(1, round(tile_size * wanted))
    return ReadPlan(level, read_size, tile_size, footprint, mpp, mpp_source)


def plan_for_slide(slide: openslide.OpenSlide, target_mpp: float, tile_size: int,
                   mpp_override: float | None = None) -> ReadPlan:
    mpp, source = base_mpp(slide.properties, mpp_override)
    return plan_read(slide.level_downsamples, mpp, target_mpp, tile_size, source)


def read_tile(slide: openslide.OpenSlide, x: int, y: int, plan: ReadPlan) -> np.ndarray:
    """One tile as an RGB uint8 array (tile_size x tile_size x 3); areas outside the scan are white."""
    region = slide.read_region((int(x), int(y)), plan.level, (plan.read_size, plan.read_size))
    if plan.needs_resize:
        region = region.resize((plan.tile_size, plan.tile_size), Image.BILINEAR)
    rgba = np.asarray(region)
    if rgba[..., 3].min() == 255:  # the usual case: fully scanned
        # PIL drops alpha 3x faster than numpy copies the RGB view, and its result is contiguous,
        # which makes batching a plain memcpy (measured in benchmarks/tiling.py).
        return np.asarray(region.convert("RGB"))
    return on_white(rgba)


def on_white(rgba: np.ndarray) -> np.ndarray:
    """RGB of an RGBA tile laid on white glass (alpha is 0 where nothing was scanned)."""
    a = rgba[..., 3:].astype(np.uint16)
    return ((rgba[..., :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def thumbnail(slide: openslide.OpenSlide, max_size: int) -> tuple[np.ndarray, tuple[float, float]]:
    """A thumbnail no larger than ``max_size`` and its level-0 pixels per thumbnail pixel (x, y)."""
    width, height = slide.dimensions
    image = np.asarray(slide.get_thumbnail((max_size, max_size)).convert("RGB"))
    return image, (width / image.shape[1], height / image.shape[0])
