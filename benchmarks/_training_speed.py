"""How fast fedpath's own training loop trains a model, in sequences per second: one measurement for the
benchmarks that compare models or DP settings by it (``dp_overhead``, ``last_block_cost``), so they time the
same thing the same way."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from torch import nn

from client.private_training import train_round
from client.sequence_data import PatientSequences, SlideFeatures
from shared.run_config import PrivacyConfig, TrainingConfig


def sequences_per_second(model: nn.Module, slides: list[SlideFeatures], seq_len: int, epochs: int, batch_size: int,
                         dp: bool, ledger: Path) -> float:
    """``train_round`` on ``slides`` for ``epochs`` epochs; the median epoch's sequences per second over the epochs
    after the first (set-up and warm-up excluded), or the one epoch's with ``epochs`` = 1.

    Args:
        model: what trains (trainable tensors only), built with the caller's seed.
        slides: one sequence per slide and epoch (one patient each).
        seq_len: tiles per sequence.
        epochs: epochs in the one round.
        batch_size: expected sequences per step.
        dp: Opacus DP-SGD at the default budget, planned for 1000 rounds (so no round is refused), or none.
        ledger: a fresh ledger file for this measurement.
    """
    times = [time.perf_counter()]
    privacy = replace(PrivacyConfig(planned_rounds=1000), enabled=dp)
    train_round(model, PatientSequences(slides, seq_len), TrainingConfig(epochs=epochs, batch_size=batch_size),
                privacy, ledger, "1", progress=False, on_epoch=lambda *_: times.append(time.perf_counter()))
    epoch_seconds = np.diff(times[1:]) if epochs > 1 else np.diff(times)
    return len(slides) / float(np.median(epoch_seconds))
