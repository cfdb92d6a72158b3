"""Stain and scanner shift: the same tissue, coloured the way another hospital's lab would colour it.

Ruifrok-Johnston colour deconvolution: a pixel's optical density (OD = -log(I / 255)) is a
mix of the haematoxylin and eosin OD vectors (plus a residual vector for what neither explains);
inverting that mix gives per-pixel stain concentrations. A site's shift turns the H and E vectors
a little (another dye batch, another scanner's colour response) and scales the concentrations
(staining time), then recomposes RGB. It acts pixel by pixel, so geometry, shape and dtype never
change, and glass (OD 0) stays glass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from shared.he_stains import REFERENCE_E, REFERENCE_H, compose, concentrations, stain_matrix, unit

MAX_TURN = 0.15  # at strength 1: per-component perturbation of a unit stain vector
MAX_SCALE = 0.35  # at strength 1: concentrations scaled by a factor in [1 - this, 1 + this]


@dataclass(frozen=True)
class StainShift:
    """One site's stain: its H and E OD vectors and how strongly each stain takes."""

    h_od: tuple[float, float, float] = REFERENCE_H
    e_od: tuple[float, float, float] = REFERENCE_E
    h_scale: float = 1.0
    e_scale: float = 1.0

    def __call__(self, tile: np.ndarray) -> np.ndarray:
        return shift_stain(tile, self)

    def cache_settings(self) -> dict:
        """What makes this site's tile vectors differ from another's (part of their cache key)."""
        return {"stain_shift": {k: [round(x, 6) for x in v] if isinstance(v, tuple) else round(v, 6)
                                for k, v in asdict(self).items()}}


def shift_stain(rgb: np.ndarray, shift: StainShift) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 as stained with ``shift``'s vectors and strengths; same shape and dtype."""
    amounts = concentrations(rgb) * np.array([shift.h_scale, shift.e_scale, 1.0], dtype=np.float32)
    return compose(amounts, stain_matrix(shift.h_od, shift.e_od), rgb.shape)


def site_shift(seed: int, site: int, strength: float) -> StainShift | None:
    """Site ``site``'s stain for ``seed`` at ``strength`` (0..1); None (unchanged tiles) at strength 0."""
    if strength <= 0:
        return None
    rng = np.random.default_rng([seed, site, 0x57A1])

    def turn(vector) -> tuple[float, float, float]:
        moved = np.abs(unit(vector) + rng.uniform(-1, 1, 3) * MAX_TURN * strength)  # OD stays non-negative
        return tuple(float(x) for x in unit(moved))

    h_od, e_od = turn(REFERENCE_H), turn(REFERENCE_E)
    h_scale, e_scale = (float(x) for x in 1.0 + rng.uniform(-1, 1, 2) * MAX_SCALE * strength)
    return StainShift(h_od, e_od, h_scale, e_scale)
