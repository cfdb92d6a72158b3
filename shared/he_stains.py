"""Haematoxylin and eosin in optical-density space (Ruifrok & Johnston colour deconvolution).

A pixel's optical density (OD = -log(I / 255)) is a mix of the stains' OD vectors plus a
residual for what neither explains; inverting that mix gives per-pixel stain concentrations.
Working there, not in RGB or hue, keeps a changed tile looking like a stained tissue: the
simulation's per-site stain shift and pretraining's stain jitter both do it this way, and the
generated slides are stained by composing amounts of H and E (``simulations/tissue_rendering.py``).
"""

from __future__ import annotations

import numpy as np

# Ruifrok & Johnston (2001) haematoxylin and eosin OD vectors; the residual is their DAB vector.
REFERENCE_H = (0.650, 0.704, 0.286)
REFERENCE_E = (0.072, 0.990, 0.105)
REFERENCE_RESIDUAL = (0.268, 0.570, 0.776)


def unit(vector) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float64)
    return v / np.linalg.norm(v)


def stain_matrix(h_od=REFERENCE_H, e_od=REFERENCE_E) -> np.ndarray:
    """Rows: the unit OD vectors of haematoxylin, eosin and the residual."""
    return np.stack([unit(h_od), unit(e_od), unit(REFERENCE_RESIDUAL)])


_INVERSE = np.linalg.inv(stain_matrix()).astype(np.float32)


def concentrations(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H*W, 3) float32 concentrations of H, E and the residual (reference stains)."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    od = -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)
    return od.reshape(-1, 3) @ _INVERSE


def compose(amounts: np.ndarray, matrix: np.ndarray, shape: tuple[int, ...], background=255.0) -> np.ndarray:
    """Concentrations stained with ``matrix``'s vectors back to a uint8 image of ``shape``: Beer-Lambert,
    ``background * exp(-OD)``. ``background`` is the light through bare glass, one value or one per
    channel; 255 (the default) inverts ``concentrations``."""
    od = amounts @ matrix.astype(np.float32)
    light = np.asarray(background, dtype=np.float32) * np.exp(-od.reshape(shape))
    return np.clip(np.rint(light), 0, 255).astype(np.uint8)
