"""Generated public tiles: what a consortium pretrains on before any round, for demos and tests.

A real consortium pretrains its trunk and fits the frozen projection on public labelled tiles
(``fedpath-server pretrain-encoder``). The demo has none, so it renders them: tissue of each class
(``tissue_rendering.render_tissue``) under random stains, from a seed no hospital uses, cut into
tiles of the sites' size and kept where tissue covers most of the tile, one PNG per tile in one
folder per class: the layout ``pretrain-encoder --tiles`` reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from client.tissue import tissue_mask
from simulations.tissue_rendering import LABELS, SlideSpec, render_tissue, site_stain

PUBLIC_SEED = 7_919  # not a hospital's: the public tiles are other tissue than any site's
MIN_TISSUE = 0.8


def make_public_tiles(out: Path, per_class: int, tile_size: int, seed: int = PUBLIC_SEED,
                      field_px: int = 1024) -> Path:
    """Write ``per_class`` tiles of each class into ``out/<class>/NNNN.png``; returns ``out``.

    Args:
        out: the folder to fill (one sub-folder per class of ``LABELS``).
        per_class: tiles of each class.
        tile_size: their side in pixels (the sites' ``tiling.tile_size``), rendered at 0.5 µm/px.
        seed: same seed, same tiles.
        field_px: side of each rendered field the tiles are cut from.
    """
    out = Path(out)
    for index, label in enumerate(LABELS):
        rng = np.random.default_rng((seed, index))
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        written = 0
        while written < per_class:
            field = render_tissue(label, SlideSpec(width=field_px, height=field_px), site_stain(rng), rng)
            mask = tissue_mask(field)
            for y in range(0, field_px - tile_size + 1, tile_size):
                for x in range(0, field_px - tile_size + 1, tile_size):
                    if written < per_class and mask[y:y + tile_size, x:x + tile_size].mean() >= MIN_TISSUE:
                        Image.fromarray(field[y:y + tile_size, x:x + tile_size]).save(folder / f"{written:04d}.png")
                        written += 1
    return out
