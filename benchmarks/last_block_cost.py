"""What fine-tuning the trunk's last block costs against training the head alone, with and without DP.

Sequences/s of the product's ``train_round`` (T = 8 tiles per sequence, batch 16, one sequence per
patient) on cached inputs: 2048-d vectors for ``trainable: head``, the block's input maps
(float16, 2048 x h x w) for ``trainable: last_block``. The map's side h depends on the tile size
(1 at 96 px, 3 at 149 px, 8 at 299 px) and so does the block's cost. Each setting trains
``TIMED_EPOCHS`` + 1 epochs and reports the median of the last ``TIMED_EPOCHS``: the first also
pays the set-up (Opacus' wrapping, the ledger), which is not what an epoch costs.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks._training_speed import sequences_per_second
from client.sequence_data import SlideFeatures
from shared.model import ModelConfig, build_trainable

SEQ_LEN, BATCH_SIZE = 8, 16
TIMED_EPOCHS = 3  # after one untimed epoch that includes the set-up
MAP_SIDE = {96: 1, 149: 3}  # InceptionV3's map entering the last block, per tile size (8 at 299 px)


def _slides(count: int, side: int | None) -> list[SlideFeatures]:
    """Slides of 2 x SEQ_LEN tiles: vectors (side None) or block-input maps of pretrained-like scale."""
    rng = np.random.default_rng(0)
    shape = (2 * SEQ_LEN, 2048) if side is None else (2 * SEQ_LEN, 2048, side, side)
    dtype = np.float32 if side is None else np.float16
    return [SlideFeatures(f"s{i}", f"p{i}", i % 2, np.abs(rng.standard_normal(shape, dtype=np.float32)).astype(dtype))
            for i in range(count)]


def _median_seq_per_s(trainable: str, dp: bool, slides: list[SlideFeatures], ledger: Path) -> float:
    torch.manual_seed(0)
    model = build_trainable(ModelConfig(trainable=trainable), 2)
    if trainable == "last_block":
        for weight in model.block.parameters():  # a block of sensible scale; its trained values do not matter
            torch.nn.init.normal_(weight, std=0.01)
    return sequences_per_second(model, slides, SEQ_LEN, TIMED_EPOCHS + 1, BATCH_SIZE, dp, ledger)


def run(quick: bool) -> dict:
    # 299 px (8x8 maps) is left out: 7x the block's cost of 149 px, hours on two shared cores under DP.
    sizes, count = ((96,), 16) if quick else ((96, 149), 64)
    logging.getLogger("fedpath.site").setLevel(logging.ERROR)
    per_size = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' secure-RNG notice
        vectors = _slides(count, None)
        head = {dp: _median_seq_per_s("head", dp, vectors, Path(tmp) / f"head-{dp}.json") for dp in (False, True)}
        for size in sizes:
            maps = _slides(count, MAP_SIDE[size])
            block = {dp: _median_seq_per_s("last_block", dp, maps, Path(tmp) / f"block-{size}-{dp}.json")
                     for dp in (False, True)}
            per_size[size] = {"map_side": MAP_SIDE[size], "last_block_seq_per_s": round(block[False], 2),
                              "last_block_dp_seq_per_s": round(block[True], 2),
                              "head_over_last_block": round(head[False] / block[False], 1),
                              "head_over_last_block_dp": round(head[True] / block[True], 1),
                              "last_block_dp_overhead": round(block[False] / block[True], 2)}
    return {"head_seq_per_s": round(head[False], 1), "head_dp_seq_per_s": round(head[True], 1),
            "per_tile_size": per_size, "seq_len": SEQ_LEN, "batch_size": BATCH_SIZE, "sequences": count,
            "timed_epochs": TIMED_EPOCHS, "statistic": "median", "torch_threads": torch.get_num_threads()}
