"""Which tiles a slide's prediction rests on: Shapley values of tiles within the scored windows.

A slide's probabilities are the mean over the windows that cover it (``predict_slides``, the
same as evaluation). Within one window the tiles are players of a game whose value for a
subset of them is the head's probability of the explained class on that subset (the window's
sequence with the other tiles left out, order kept; the empty subset is worth chance, 1/C).
A tile's **importance** is its Shapley value in each window it is in, averaged like the windows
are: positive tiles pull the slide towards the class, negative ones away from it, and the
importances of a slide add up to its probability of the class minus chance.

Why not plain occlusion (drop one tile, see what changes): neighbouring tiles in a window look
alike, so a confident model does not miss any single one of them and every tile of a tumour
window scores about zero; Shapley values share the window's evidence among tiles that carry it.
With up to ``EXACT_PLAYERS`` distinct tiles per window every subset is scored (2^T sequences per
window, cheap beside the trunk); longer windows use ``PERMUTATIONS`` sampled orders (unbiased,
fixed seed, so reruns agree). In ``grid`` mode a window is one tile, whose value is exact.

A tile's **probability** is the head applied to that tile alone: in ``grid`` mode its 8x8 map,
exactly what the model was trained on; in ``tiles`` mode a sequence of one tile, shorter than
the training windows, so it says what the tile looks like to the head rather than what the slide
model concludes from it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from math import factorial

import numpy as np
import torch
from torch import nn

from client.sequence_data import SlideFeatures, predict_slides, window_probabilities
from client.sequences import evaluation_windows

EXACT_PLAYERS = 10  # 2^10 subsets per window; beyond this, sampled orders
PERMUTATIONS = 64
SEED = 0
CHUNK = 256  # sequences per head call: bounds memory on slides with tens of thousands of tiles


@dataclass(frozen=True)
class Explanation:
    probabilities: np.ndarray  # (classes,) the slide's, as evaluation computes them
    explained: int  # the class importance and tile probability refer to
    importance: np.ndarray  # (N,) each tile's share of the slide's probability of `explained` above chance
    tile_probability: np.ndarray  # (N,) probability of `explained` from the tile alone

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.probabilities))


@torch.inference_mode()
def explain_slide(head: nn.Module, slide: SlideFeatures, length: int, explained: int | None = None) -> Explanation:
    """Slide probabilities, and per-tile importance and probability for class ``explained``
    (default: the predicted class)."""
    head.eval()
    probabilities = predict_slides(head, [slide], length)[0]
    target = int(np.argmax(probabilities)) if explained is None else explained
    chance = 1.0 / len(probabilities)
    if slide.grid:  # one tile per window: its Shapley value is its own probability above chance
        alone = window_probabilities(head, slide, length)[:, target].numpy()
        return Explanation(probabilities, target, ((alone - chance) / len(alone)).astype(np.float32),
                           alone.astype(np.float32))
    features = torch.from_numpy(slide.features)
    alone = _scores(head, features, np.arange(len(features))[:, None], target)
    windows = evaluation_windows(len(features), length)
    players = np.unique(windows[0]) if len(features) < length else None  # one window that wraps around
    if players is None:  # every window holds `length` distinct tiles: players are positions
        coalitions, weights = _game(length)
        values = _coalition_values(head, features, windows, coalitions, target, chance)
        shares = values @ weights  # (K, length)
        importance = np.bincount(windows.ravel(), weights=shares.ravel(), minlength=len(features))
    else:  # a tile may fill several positions: it enters or leaves with all of them
        coalitions, weights = _game(len(players))
        membership = players[:, None] == windows[0][None, :]
        positions = (coalitions.astype(np.int64) @ membership) > 0
        importance = np.zeros(len(features))
        importance[players] = (_coalition_values(head, features, windows, positions, target, chance) @ weights)[0]
    return Explanation(probabilities, target, (importance / len(windows)).astype(np.float32), alone)


def _game(players: int) -> tuple[np.ndarray, np.ndarray]:
    """Coalitions (R, players) bool and weights (R, players) with Shapley values = values @ weights."""
    if players <= EXACT_PLAYERS:
        coalitions = np.array(list(itertools.product((False, True), repeat=players)), dtype=bool)
        sizes = coalitions.sum(axis=1)
        share = np.array([factorial(s) * factorial(players - s - 1) / factorial(players) for s in range(players)])
        # v(S ∪ {j}) enters with the weight of |S| = size - 1, v(S) without j with the weight of |S| = size.
        weights = np.where(coalitions, share[np.maximum(sizes - 1, 0)][:, None],
                           -share[np.minimum(sizes, players - 1)][:, None])
        return coalitions, weights
    rng = np.random.default_rng(SEED)
    coalitions = np.zeros((PERMUTATIONS * (players + 1), players), dtype=bool)
    weights = np.zeros(coalitions.shape)
    for p, order in enumerate(rng.permuted(np.tile(np.arange(players), (PERMUTATIONS, 1)), axis=1)):
        base = p * (players + 1)
        for step, player in enumerate(order, start=1):  # prefix `step` adds `player` to prefix `step - 1`
            coalitions[base + step] = coalitions[base + step - 1]
            coalitions[base + step, player] = True
            weights[base + step, player] += 1 / PERMUTATIONS
            weights[base + step - 1, player] -= 1 / PERMUTATIONS
    return coalitions, weights


def _coalition_values(head: nn.Module, features: torch.Tensor, windows: np.ndarray, positions: np.ndarray,
                      target: int, chance: float) -> np.ndarray:
    """(K, R): probability of ``target`` for every window restricted to every row of ``positions``
    (bool (R, T), which window positions take part); chance for the empty subset."""
    values = np.full((len(windows), len(positions)), chance)
    sizes = positions.sum(axis=1)
    for size in np.unique(sizes[sizes > 0]):
        rows = np.flatnonzero(sizes == size)
        steps = np.stack([np.flatnonzero(positions[row]) for row in rows])  # (rows, size), order kept
        tiles = windows[:, steps].reshape(-1, size)  # (K * rows, size)
        values[:, rows] = _scores(head, features, tiles, target).reshape(len(windows), len(rows))
    return values


def _scores(head: nn.Module, features: torch.Tensor, tiles: np.ndarray, target: int) -> np.ndarray:
    """Probability of ``target`` for each row of tile indices (B, L), ``CHUNK`` rows per head call.

    Every chunk's sequences are gathered into one buffer: a new tensor per chunk (tens of MB, a size glibc
    serves from its heap) left the heap fragmented: explaining a 7,273-tile slide added 0.35-0.9 GB to
    `predict`'s peak (0.06 GB with the buffer and 256-row chunks).
    """
    rows, length = tiles.shape
    chunk = max(1, min(CHUNK, rows))
    buffer = torch.empty(chunk * length, features.shape[-1], dtype=features.dtype, device=features.device)
    scores = np.empty(rows, dtype=np.float32)
    for start in range(0, rows, chunk):
        index = torch.from_numpy(tiles[start:start + chunk].reshape(-1)).to(features.device)
        sequences = torch.index_select(features, 0, index, out=buffer[:len(index)])
        scores[start:start + chunk] = torch.softmax(head(sequences.view(-1, length, features.shape[-1])),
                                                    dim=-1)[:, target].cpu().numpy()
    return scores
