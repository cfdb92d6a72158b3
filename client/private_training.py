"""Local training of the sequence head (or the trunk's last block + head), with Opacus DP-SGD and
the site's privacy ledger.

One call is one round of local training (``epochs`` passes). Noise is chosen once for the
whole plan (``planned_rounds`` rounds of this size) and the ledger refuses a round that would
overspend the budget before any gradient is computed. DP is off only when the config says
``privacy.enabled: false``, and then every round says so in the log.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import shared.recurrent_grad_sampler  # noqa: F401  (registers the RNN core's per-sample gradients)
from client.privacy_ledger import PrivacyBudget, PrivacyLedger
from shared.run_config import PrivacyConfig, TrainingConfig

log = logging.getLogger("fedpath.site")
# Opacus hooks fire on module outputs when the head's input (cached vectors) needs no gradient:
# expected here, not a problem.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to "
                                          "module outputs")


@dataclass(frozen=True)
class RoundResult:
    examples: int  # privacy units (patients) in the training set
    loss: float  # mean training loss over the round's non-empty batches
    steps: int  # optimizer steps, empty Poisson batches included
    epsilon: float | None  # ε spent so far by this ledger; None without DP
    delta: float | None
    noise_multiplier: float | None


def train_round(head: nn.Module, dataset: Dataset, training: TrainingConfig, privacy: PrivacyConfig,
                ledger_path: Path, round_id: str, progress: bool = True,
                on_epoch: Callable[[int, float], None] | None = None, proximal_mu: float = 0.0) -> RoundResult:
    """Train ``head`` in place for ``training.epochs`` epochs; returns what the round spent.

    ``proximal_mu`` > 0 (FedProx) pulls the weights towards the ones the round started from,
    as a step after each DP-SGD step: the pull only uses weights that are already private,
    so it costs no privacy, where a proximal term in the loss would be clipped per patient.
    """
    torch.manual_seed(training.seed)
    anchors = [p.detach().clone() for p in head.parameters()] if proximal_mu > 0 else []
    loader = DataLoader(dataset, batch_size=training.batch_size, shuffle=True)
    optimizer = torch.optim.Adam(head.parameters(), lr=training.learning_rate)
    head.train()
    model, engine, ledger, sigma, criterion = head, None, None, None, nn.CrossEntropyLoss()
    if privacy.enabled:
        ledger = PrivacyLedger(ledger_path, PrivacyBudget(privacy.epsilon, privacy.delta, privacy.accountant))
        sample_rate = 1 / len(loader)  # what Opacus' Poisson loader uses
        steps = len(loader) * training.epochs
        sigma = ledger.noise_for_plan(sample_rate, steps, privacy.planned_rounds)
        ledger.check_round(sigma, sample_rate, steps, round_id=round_id)
        engine = PrivacyEngine(accountant=privacy.accountant)
        ledger.attach(engine)
        # Ghost clipping: per-patient gradient norms without materialising per-patient gradients
        # of the 2048 -> 128 projection, which dominated DP cost (same update as hooks mode,
        # checked in tests/test_private_training.py). Empty Poisson batches still take a noisy step.
        # The last block (shared.model.FoldedBlock) has no hook rule: Opacus computes its per-sequence
        # gradients with functorch, then clips them with the head's.
        model, optimizer, criterion, loader = engine.make_private(
            module=head, optimizer=optimizer, data_loader=loader, criterion=criterion, noise_multiplier=sigma,
            max_grad_norm=privacy.max_grad_norm, poisson_sampling=True, grad_sample_mode="ghost")
    else:
        log.warning("DIFFERENTIAL PRIVACY IS OFF (privacy.enabled: false): this round's update is not "
                    "differentially private; only a federation that does not require DP accepts it")
    model.train()
    losses: list[float] = []
    taken = 0
    for epoch in range(1, training.epochs + 1):
        epoch_losses = []
        for sequences, labels in tqdm(loader, desc=f"epoch {epoch}/{training.epochs}", unit="batch",
                                      disable=not progress, leave=False):
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(sequences), labels)
            loss.backward()
            optimizer.step()
            if anchors:
                with torch.no_grad():
                    for weight, anchor in zip(head.parameters(), anchors):
                        weight.sub_(training.learning_rate * proximal_mu * (weight - anchor))
            taken += 1
            if len(labels):
                epoch_losses.append(loss.item())
        losses += epoch_losses
        if on_epoch:
            on_epoch(epoch, float(np.mean(epoch_losses)) if epoch_losses else float("nan"))
    epsilon = None
    if engine is not None:
        epsilon = ledger.record_from_engine(engine, round_id)
        model._close()  # drop Opacus' hooks so the plain head evaluates without them
        log.info("round %s: ε spent %.3f of %.3f (δ=%g, σ=%.3f)", round_id, epsilon, privacy.epsilon,
                 privacy.delta, sigma)
    head.eval()
    return RoundResult(len(dataset), float(np.mean(losses)) if losses else float("nan"),
                       taken, epsilon, privacy.delta if privacy.enabled else None, sigma)
