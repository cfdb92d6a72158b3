"""Sequences of T tile vectors per slide, for the recurrent head.

Cached tiles are already in spatial (Hilbert) order, so a window of consecutive indices is a
compact patch of tissue. Training draws windows at random; evaluation covers every tile of the
slide with a fixed set of windows, so a slide's score does not depend on luck.
"""

from __future__ import annotations

import numpy as np


def window(start: int, length: int, n_tiles: int) -> np.ndarray:
    """Indices of the window of ``length`` tiles starting at ``start``; short slides wrap around."""
    return (start + np.arange(length)) % n_tiles


def training_windows(n_tiles: int, length: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random windows (count x length indices) over a slide of ``n_tiles`` tiles."""
    if n_tiles <= 0:
        raise ValueError("a slide without tiles has no sequences")
    last_start = max(n_tiles - length, 0)
    starts = rng.integers(0, last_start + 1, size=count)
    return np.stack([window(int(s), length, n_tiles) for s in starts])


def evaluation_windows(n_tiles: int, length: int) -> np.ndarray:
    """Windows that together cover every tile exactly as often as needed, in a fixed order.

    Consecutive, non-overlapping windows; the last one is aligned to the slide's end (so it may
    overlap its neighbour) rather than padded with repeated tiles.
    """
    if n_tiles <= 0:
        raise ValueError("a slide without tiles has no sequences")
    if n_tiles <= length:
        return window(0, length, n_tiles)[None, :]
    starts = list(range(0, n_tiles - length + 1, length))
    if starts[-1] + length < n_tiles:
        starts.append(n_tiles - length)
    return np.stack([window(s, length, n_tiles) for s in starts])
