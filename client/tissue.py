"""Tissue detection on a slide thumbnail: stained tissue is coloured, glass is white or grey.

Saturation separates H&E tissue from background better than brightness (pen marks aside), and
Otsu's threshold adapts to each slide's staining. A floor keeps near-empty slides from having
their faint background noise declared tissue.
"""

from __future__ import annotations

import numpy as np

MIN_SATURATION = 20  # of 255: below this nothing is tissue, whatever Otsu says
MAX_BRIGHTNESS = 235  # of 255: brighter pixels are glass even when slightly tinted
MIN_BRIGHTNESS = 15  # of 255: black is scanner border or ink, not tissue


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values: the cut maximising between-class variance."""
    hist = np.bincount(values.ravel().astype(np.uint8), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    levels = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(hist)
    weight_high = total - weight_low
    mean_low = np.cumsum(hist * levels)
    mean_all = mean_low[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * weight_low - mean_low * total) ** 2 / (weight_low * weight_high)
    between[~np.isfinite(between)] = 0.0
    return float(np.argmax(between))


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of an RGB uint8 image, scaled to 0..255."""
    rgb = rgb.astype(np.int16)
    high = rgb.max(axis=-1)
    low = rgb.min(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sat = np.where(high > 0, (high - low) * 255 // np.maximum(high, 1), 0)
    return sat.astype(np.uint8)


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean mask of tissue pixels in an RGB uint8 thumbnail."""
    sat = saturation(rgb)
    threshold = max(otsu_threshold(sat), MIN_SATURATION)
    brightness = rgb.mean(axis=-1)
    return (sat > threshold) & (brightness < MAX_BRIGHTNESS) & (brightness > MIN_BRIGHTNESS)
