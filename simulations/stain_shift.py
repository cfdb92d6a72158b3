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

# Ruifrok & Johnston (2001) haematoxylin and eosin OD vectors; the residual is their DAB vector.
REFERENCE_H = (0.650, 0.704, 0.286)
REFERENCE_E = (0.072, 0.990, 0.105)
REFERENCE_RESIDUAL = (0.268, 0.570, 0.776)

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


def _unit(vector) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float64)
    return v / np.linalg.norm(v)


def _stain_matrix(h_od, e_od) -> np.ndarray:
    return np.stack([_unit(h_od), _unit(e_od), _unit(REFERENCE_RESIDUAL)])


REFERENCE = _stain_matrix(REFERENCE_H, REFERENCE_E)


def shift_stain(rgb: np.ndarray, shift: StainShift) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 as stained with ``shift``'s vectors and strengths; same shape and dtype."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    od = -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)
    concentrations = od.reshape(-1, 3) @ np.linalg.inv(REFERENCE).astype(np.float32)
    concentrations *= np.array([shift.h_scale, shift.e_scale, 1.0], dtype=np.float32)
    shifted = concentrations @ _stain_matrix(shift.h_od, shift.e_od).astype(np.float32)
    out = 255.0 * np.exp(-shifted.reshape(rgb.shape))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def site_shift(seed: int, site: int, strength: float) -> StainShift | None:
    """Site ``site``'s stain for ``seed`` at ``strength`` (0..1); None (unchanged tiles) at strength 0."""
    if strength <= 0:
        return None
    rng = np.random.default_rng([seed, site, 0x57A1])

    def turn(vector) -> tuple[float, float, float]:
        moved = np.abs(_unit(vector) + rng.uniform(-1, 1, 3) * MAX_TURN * strength)  # OD stays non-negative
        return tuple(float(x) for x in _unit(moved))

    h_od, e_od = turn(REFERENCE_H), turn(REFERENCE_E)
    h_scale, e_scale = (float(x) for x in 1.0 + rng.uniform(-1, 1, 2) * MAX_SCALE * strength)
    return StainShift(h_od, e_od, h_scale, e_scale)
