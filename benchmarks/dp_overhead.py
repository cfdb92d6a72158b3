"""What differential privacy costs in local training: the product's head and training loop, DP on and off.

Sequences/s of ``train_round`` on cached-feature-like inputs (random non-negative 2048-d vectors,
T = 8, batch 16, the site defaults) for the same ``SequenceHead``: without DP, with DP (Opacus,
Poisson sampling, the ledger), and with DP using Opacus' stock ``DPRNN``/``DPGRU``/``DPLSTM`` in
place of ``RecurrentCore``. Each setting trains 4 epochs of 2048 sequences (a DP epoch lasts
seconds, not a fraction of one); the first, which also pays Opacus' set-up and the ledger, is not
timed, and a run's speed is the median of the other three. The three settings take turns, three
times, and each setting's speed is the median of its three runs; ``overhead_ratio_per_repeat``
shows the spread. (Until 2026-12-02: the fastest of 6 epochs of 512 sequences, a quarter of a
second each, whose ratio moved from 2.0 to 3.4 between two runs on the idle machine; one pass of
the new epochs gave 2.36 and 3.14 in two runs.)
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from opacus.layers import DPGRU, DPLSTM, DPRNN
from torch import nn

from benchmarks._training_speed import sequences_per_second
from client.sequence_data import SlideFeatures
from shared.model import SequenceHead

SEQ_LEN, BATCH_SIZE = 8, 16
STOCK = {"rnn": DPRNN, "gru": DPGRU, "lstm": DPLSTM}


class _StockCore(nn.Module):
    """Opacus' reference layer behind RecurrentCore's interface (output sequence only)."""

    def __init__(self, kind: str, size: int):
        super().__init__()
        self.layer = STOCK[kind](size, size, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[0]


def _slides(count: int) -> list[SlideFeatures]:
    rng = np.random.default_rng(0)
    return [SlideFeatures(f"s{i}", f"p{i}", i % 2, np.abs(rng.standard_normal((40, 2048), dtype=np.float32)))
            for i in range(count)]


def _median_seq_per_s(kind: str, setting: str, slides: list[SlideFeatures], epochs: int, ledger: Path) -> float:
    torch.manual_seed(0)
    head = SequenceHead(2, kind)
    if setting == "stock":
        head.core = _StockCore(kind, 128)
    return sequences_per_second(head, slides, SEQ_LEN, epochs, BATCH_SIZE, setting != "nondp", ledger)


def run(quick: bool) -> dict:
    count, epochs, repeats = (128, 2, 1) if quick else (2048, 4, 3)
    slides = _slides(count)
    logging.getLogger("fedpath.site").setLevel(logging.ERROR)
    per_kind = {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' secure-RNG notice
        for kind in ("rnn", "gru", "lstm"):
            # the settings take turns, `repeats` times: a slow minute of the machine hits all of them
            runs = [{s: _median_seq_per_s(kind, s, slides, epochs, Path(tmp) / f"{kind}-{s}-{r}.json")
                     for s in ("nondp", "dp", "stock")} for r in range(repeats)]
            speed = {s: float(np.median([run[s] for run in runs])) for s in ("nondp", "dp", "stock")}
            ratios = [run["nondp"] / run["dp"] for run in runs]
            per_kind[kind] = {"nondp_seq_per_s": round(speed["nondp"], 1), "dp_seq_per_s": round(speed["dp"], 1),
                              "stock_dp_seq_per_s": round(speed["stock"], 1),
                              "overhead_ratio": round(speed["nondp"] / speed["dp"], 2),
                              "overhead_ratio_per_repeat": [round(r, 2) for r in ratios],
                              "opacus_stock_overhead_ratio": round(speed["nondp"] / speed["stock"], 2)}
    return {"kind": "rnn", **per_kind["rnn"], "per_kind": per_kind, "batch_size": BATCH_SIZE, "seq_len": SEQ_LEN,
            "sequences": count, "epochs": epochs, "repeats": repeats, "torch_threads": torch.get_num_threads()}
