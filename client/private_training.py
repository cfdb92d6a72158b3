"""Local training of the sequence head (or the trunk's last block + head), with Opacus DP-SGD and
the site's privacy ledger.

One :class:`PrivateRound` is one round at a site: it builds the Poisson-sampled loader first,
plans the noise from that loader (the sample rate and the number of steps Opacus will really
use, so the ledger records exactly what was planned), refuses before any computation when the
round would overspend the budget, can release evaluation counts under the Gaussian mechanism,
and trains ``epochs`` passes. ``train_round`` is the one-call form for local training.

Privacy against the server, not only against the world: the DP noise and the Poisson sampling
come from a generator seeded from the operating system's entropy in every round. The server's
round plan still seeds which windows of a slide are drawn (public, harmless), but nothing the
server sent or could know lets it replay the noise and subtract it. Only a simulation may ask
for reproducible noise (``noise_seed``), and the model card then says so.
"""

from __future__ import annotations

import logging
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import shared.recurrent_grad_sampler  # noqa: F401  (registers the RNN core's per-sample gradients)
from client.privacy_ledger import PrivacyBudget, PrivacyLedger, ReleasePlan
from shared.devices import module_device
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
    sample_rate: float | None  # 1 / len(the Poisson loader Opacus trained with); None without DP
    epsilon: float | None  # ε spent so far by this ledger; None without DP
    delta: float | None
    noise_multiplier: float | None


def private_generator(device: torch.device | str = "cpu", seed: int | None = None) -> torch.Generator:
    """A generator for DP noise and Poisson sampling, seeded from the OS's entropy (``secrets``).

    ``seed`` makes it reproducible: for simulations that ask for it explicitly, never for a
    deployed site. torch's generator is not a CSPRNG (Opacus' ``secure_mode`` needs torchcsprng,
    which has no build for torch 2): its output is never released, only noise added to gradients,
    but the limitation is stated in docs/security.md. On CUDA the generator lives on the device.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


def release_dtype(device: torch.device) -> torch.dtype:
    """float64 noise for the released numbers, float32 on Apple's GPU (MPS has no float64): the
    noise's scale is a handful of counts, far above float32's resolution either way."""
    return torch.float32 if device.type == "mps" else torch.float64


class PrivateRound:
    """One round of private work at a site: planned noise, optional evaluation release, training.

    Args:
        head: the model to train in place (trainable tensors only; the trunk is frozen).
        dataset: one sample per privacy unit (patient).
        training: local epochs, expected batch size, learning rate.
        privacy: the budget for the whole federation and the rounds it must last.
        ledger_path: the site's ledger for this federation (created on first use).
        evaluations: evaluation releases the plan must also pay for (0: training only).
        evaluation_share: the part of ε the ``evaluations`` releases spend together.
        noise_seed: only for a simulation that asked for reproducible noise; None draws from the OS.
        settings: what else the federation chose that the noise plan is pinned to (the plaintext
            weight), beside the batch size and epochs; a later change is refused (``PrivacyLedger.plan``).
        lifetime_delta: the δ at which ``privacy.lifetime_epsilon`` is checked over all federations (the
            site's own δ; None: ``privacy.delta``).
    """

    def __init__(self, head: nn.Module, dataset: Dataset, training: TrainingConfig, privacy: PrivacyConfig,
                 ledger_path: Path, evaluations: int = 0, evaluation_share: float = 0.0,
                 noise_seed: int | None = None, lifetime_delta: float | None = None,
                 settings: dict | None = None) -> None:
        self.head, self.dataset, self.training, self.privacy = head, dataset, training, privacy
        self.generator = private_generator(module_device(head), noise_seed)
        self.loader: DataLoader = DataLoader(dataset, batch_size=training.batch_size, shuffle=True,
                                             generator=private_generator("cpu", noise_seed))
        self.ledger: PrivacyLedger | None = None
        self.plan: ReleasePlan | None = None
        if privacy.enabled:
            # Opacus' Poisson loader as make_private would build it: its length, not the plain loader's,
            # is what the accountant records (1/len of the wrapped loader, which is len - 1 batches for
            # some sizes), so the plan is made from it and it is the loader that trains.
            self.loader = DPDataLoader.from_data_loader(self.loader, generator=private_generator("cpu", noise_seed))
            self.ledger = PrivacyLedger(ledger_path, PrivacyBudget(privacy.epsilon, privacy.delta, privacy.accountant),
                                        lifetime_epsilon=privacy.lifetime_epsilon, lifetime_delta=lifetime_delta)
            self.plan = self.ledger.plan(1 / len(self.loader), len(self.loader) * training.epochs,
                                         privacy.planned_rounds, evaluations=evaluations,
                                         evaluation_share=evaluation_share,
                                         settings={"batch_size": training.batch_size, "epochs": training.epochs,
                                                   **(settings or {})})

    @property
    def sample_rate(self) -> float | None:
        return None if self.plan is None else self.plan.sample_rate

    def check(self, round_id: str, train: bool = True, evaluation: bool = False) -> None:
        """Raise BudgetExceeded (or LedgerError) before any data is touched if this round's releases
        would take the site past its budget; no-op without DP."""
        if self.ledger is None:
            return
        segments = [*([self.plan.evaluation_segment] if evaluation else []),
                    *([self.plan.training_segment] if train else [])]
        if segments:
            self.ledger.check_segments(segments, round_id=round_id)

    def release(self, values: np.ndarray, sensitivity: float, release_id: str) -> np.ndarray:
        """``values`` plus Gaussian noise of std σ_e · ``sensitivity`` (the L2 change one privacy unit can
        make), recorded in the ledger before it returns; exact values when DP is off."""
        values = np.asarray(values, dtype=np.float64)
        if self.ledger is None:
            return values
        if self.plan.evaluation_noise is None:
            raise ValueError("this round's plan has no evaluation releases (evaluations=0)")
        device = self.generator.device
        noise = torch.normal(0.0, self.plan.evaluation_noise * sensitivity, size=values.shape,
                             generator=self.generator, device=device, dtype=release_dtype(device))
        self.ledger.record_segment(self.plan.evaluation_segment, release_id, kind="evaluation")
        return values + noise.cpu().numpy()

    def train(self, round_id: str, progress: bool = True, on_epoch: Callable[[int, float], None] | None = None,
              proximal_mu: float = 0.0) -> RoundResult:
        """Train the head in place for ``training.epochs`` epochs; returns what the round spent.

        ``proximal_mu`` > 0 (FedProx) pulls the weights towards the ones the round started from,
        as a step after each DP-SGD step: the pull only uses weights that are already private,
        so it costs no privacy, where a proximal term in the loss would be clipped per patient.
        """
        head, training, privacy = self.head, self.training, self.privacy
        anchors = [p.detach().clone() for p in head.parameters()] if proximal_mu > 0 else []
        optimizer = torch.optim.Adam(head.parameters(), lr=training.learning_rate)
        head.train()
        model, engine, loader, criterion = head, None, self.loader, nn.CrossEntropyLoss()
        if self.ledger is not None:
            sigma = self.plan.noise_multiplier
            self.ledger.check_segments([self.plan.training_segment], round_id=round_id)
            engine = PrivacyEngine(accountant=privacy.accountant)
            self.ledger.attach(engine)
            # Ghost clipping: per-patient gradient norms without materialising per-patient gradients
            # of the 2048 -> 128 projection, which dominated DP cost (same update as hooks mode,
            # checked in tests/test_private_training.py). Empty Poisson batches still take a noisy step.
            # The last block (shared.model.FoldedBlock) has no hook rule: Opacus computes its
            # per-sequence gradients with functorch, then clips them with the head's.
            # The loader is already Opacus' Poisson loader (poisson_sampling=False keeps it as it is),
            # and the noise comes from the round's private generator.
            model, optimizer, criterion, loader = engine.make_private(
                module=head, optimizer=optimizer, data_loader=loader, criterion=criterion, noise_multiplier=sigma,
                max_grad_norm=privacy.max_grad_norm, poisson_sampling=False, grad_sample_mode="ghost",
                noise_generator=self.generator)
        else:
            log.warning("DIFFERENTIAL PRIVACY IS OFF (privacy.enabled: false): this round's update is not "
                        "differentially private; only a federation that does not require DP accepts it")
        model.train()
        device = module_device(head)  # the site's GPU when the head was put there (features.device)
        losses: list[float] = []
        taken = 0
        for epoch in range(1, training.epochs + 1):
            epoch_losses = []
            for sequences, labels in tqdm(loader, desc=f"epoch {epoch}/{training.epochs}", unit="batch",
                                          disable=not progress, leave=False):
                optimizer.zero_grad(set_to_none=True)
                sequences, labels = sequences.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                loss = criterion(model(sequences), labels)
                loss.backward()
                optimizer.step()
                if anchors:
                    with torch.no_grad():
                        for weight, anchor in zip(head.parameters(), anchors, strict=True):
                            weight.sub_(training.learning_rate * proximal_mu * (weight - anchor))
                taken += 1
                if len(labels):
                    epoch_losses.append(loss.item())
            losses += epoch_losses
            if on_epoch:
                on_epoch(epoch, float(np.mean(epoch_losses)) if epoch_losses else float("nan"))
        epsilon = sigma = sample_rate = None
        if engine is not None:
            # What the optimizer and the loader really used, read from them (not from the plan).
            sigma, sample_rate = float(optimizer.noise_multiplier), 1 / len(loader)
            epsilon = self.ledger.record_from_engine(engine, round_id)
            model.to_standard_module()  # drop Opacus' hooks so the plain head evaluates without them
            log.info("round %s: ε spent %.3f of %.3f (δ=%g, σ=%.3f)", round_id, epsilon, privacy.epsilon,
                     privacy.delta, sigma)
        head.eval()
        return RoundResult(len(self.dataset), float(np.mean(losses)) if losses else float("nan"), taken,
                           sample_rate, epsilon, privacy.delta if privacy.enabled else None, sigma)


def train_round(head: nn.Module, dataset: Dataset, training: TrainingConfig, privacy: PrivacyConfig,
                ledger_path: Path, round_id: str, progress: bool = True,
                on_epoch: Callable[[int, float], None] | None = None, proximal_mu: float = 0.0,
                noise_seed: int | None = None) -> RoundResult:
    """Train ``head`` in place for one round under DP-SGD with the site's ledger (no evaluation release).

    Args:
        head: the model to train; only its trainable tensors change.
        dataset: one sample per privacy unit (patient), e.g. ``client.sequence_data.PatientSequences``.
        training: local epochs, expected batch size (Poisson sampling) and learning rate.
        privacy: ε and δ for the whole plan (``planned_rounds`` rounds of this size), accountant,
            clipping bound; ``enabled: false`` trains without DP and says so in the log.
        ledger_path: the ledger file; it plans σ once and refuses a round that would overspend.
        round_id: this round's id in the ledger (a retried round needs a new id).
        progress: show a progress bar per epoch.
        on_epoch: called with (epoch, mean loss) after every epoch.
        proximal_mu: FedProx pull towards the starting weights after every step (no privacy cost).
        noise_seed: reproducible noise, for simulations that ask for it only; None draws from the OS.

    Returns:
        RoundResult: patients, mean loss, optimizer steps, sample rate, ε spent so far, δ, σ.
    """
    session = PrivateRound(head, dataset, training, privacy, ledger_path, noise_seed=noise_seed)
    return session.train(round_id, progress=progress, on_epoch=on_epoch, proximal_mu=proximal_mu)
