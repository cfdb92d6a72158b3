"""Running the frozen trunk over tiles: batched, channels-last, no autograd, reading in parallel
(``client/tile_reader.py``), on the site's GPU under autocast when it has one (``shared/devices.py``)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from client.tile_reader import Tiles, tile_batches
from shared.devices import ShrinkingBatches, module_device, resolve_device, trunk_precision, use_threads
from shared.encoder import INCEPTION, TileEncoder, build_encoder
from shared.memory import FreeMemory
from shared.model import grid_sequence


def extract_features(encoder: TileEncoder | torch.nn.Module, tiles: Tiles, batch_size: int, num_workers: int,
                     on_batch: Callable[[int], None] | None = None, grid: bool = False,
                     block_input: bool = False) -> np.ndarray:
    """Vectors of every tile of ``tiles`` in order: (N, 2048) float32 ((N, feature_dim) for another backbone),
    or with ``grid`` each tile's last-block map as positions, (N, h*w, 2048) (64 positions at 299 px), or with
    ``block_input``
    the map entering the last block, (N, 2048, h, w), float16 where it fits (half the disk and memory;
    the block computes in float32).

    ``num_workers`` reader processes decode tiles while the trunk runs (0: read here, between
    batches). The trunk runs where ``encoder`` lives (``load_encoder``'s device): on a GPU the tiles
    go through pinned memory with non-blocking copies, the trunk runs under autocast, and a batch
    that runs out of memory is halved and retried (``shared.devices.ShrinkingBatches``).
    ``on_batch(n)`` is called after each batch with its number of tiles (for progress bars).
    """
    device = module_device(encoder)
    pinned = device.type == "cuda"
    encoder.eval()

    def run(batch: torch.Tensor) -> torch.Tensor:
        tiles_nchw = as_nchw(batch.to(device, non_blocking=True))
        with trunk_precision(device):
            if block_input:
                out = encoder.block_input(tiles_nchw)
            else:
                out = grid_sequence(encoder.feature_map(tiles_nchw)) if grid else encoder(tiles_nchw)
        return out.float().cpu()

    trunk = ShrinkingBatches(run)
    free_memory = FreeMemory()  # without it, glibc keeps the freed batches: +0.3 MB per tile (shared/memory.py)
    out = []
    with torch.inference_mode():
        # An item of one batch gets no reader: starting one costs more than reading it here.
        for tiles_hwc in tile_batches(tiles, batch_size, num_workers):
            batch = torch.from_numpy(tiles_hwc)
            vectors = trunk(batch.pin_memory() if pinned else batch)
            out.append(half_if_it_fits(vectors.contiguous().numpy()) if block_input else vectors.numpy())
            free_memory()
            if on_batch:
                on_batch(len(batch))
    if not out:
        return np.zeros((0, encoder.feature_dim), dtype=np.float32)
    vectors = np.concatenate(out) if block_input else np.concatenate(out).astype(np.float32, copy=False)
    out.clear()
    free_memory(now=True)  # the last batches' and the per-batch results' pages, before the caller's next stage
    return vectors


def as_nchw(batch: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] tiles -> [B, 3, H, W] in channels-last memory, without copying."""
    return batch.permute(0, 3, 1, 2)


def half_if_it_fits(maps: np.ndarray) -> np.ndarray:
    """float16 unless a value would overflow it: a pretrained trunk's maps fit, but an untrained
    one's activations grow to 1e11 (its BatchNorm statistics normalise nothing) and stay float32."""
    return maps.astype(np.float16) if np.abs(maps).max(initial=0.0) < np.finfo(np.float16).max else maps


def load_encoder(weights: str, threads: int = 0, device: str | torch.device = "cpu",
                 backbone: str = INCEPTION) -> torch.nn.Module:
    """The frozen trunk, ready for inference: eval mode, channels-last memory layout, on ``device``
    (a ``features.device`` setting such as ``auto``, or a torch device). ``backbone``: ``features.backbone``."""
    use_threads(threads)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    encoder = build_encoder(backbone, weights).eval()
    encoder.requires_grad_(False)
    return encoder.to(device=device, memory_format=torch.channels_last)
