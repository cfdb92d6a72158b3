"""The baselines a reviewer asks of a federated result: all data pooled, and each site alone.

Both train the same model variant with the same optimiser settings, privacy target and budget of
passes over the data as the federation (rounds x local epochs, in one run), and are scored on
the same held-out test set, so the only difference left is who sees which data. The training
itself is the sites' own ``train_round`` (``client/private_training.py``: DP-SGD and a privacy
ledger) on the caches of the simulation's ``site.yaml`` files: the pooled one for the
centralised model, each site's for local-only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.feature_cache import FeatureCache
from client.private_training import train_round
from client.sequence_data import PatientSequences, load_split
from client.site_config import load_site_config
from shared.checkpoints import save_checkpoint
from shared.errors import UserError
from shared.model import ModelConfig, build_head
from shared.parameters import model_arrays
from shared.run_config import PrivacyConfig, TrainingConfig
from simulations.materialise import SimLayout
from simulations.sim_config import SimConfig
from simulations.sim_runner import evaluate_checkpoint

log = logging.getLogger("fedpath.sim")

FINAL_METRICS = ("accuracy", "auc", "sensitivity", "specificity", "balanced_accuracy", "loss")


@dataclass(frozen=True)
class BaselinePlan:
    """What every baseline run shares with the federation it is compared with."""

    classes: tuple[str, ...]
    model: ModelConfig
    sequence_length: int
    training: TrainingConfig  # epochs: the federation's rounds x local epochs
    dp: bool
    epsilon: float  # the DP target (ignored without DP)
    delta: float
    positive_class: str | None = None

    @classmethod
    def of(cls, sim: SimConfig) -> "BaselinePlan":
        """The plan that matches a simulation: its model, optimiser, privacy target and epoch budget."""
        training = sim.training
        return cls(classes=tuple(sim.classes), model=sim.model, sequence_length=training.sequence_length,
                   training=TrainingConfig(epochs=sim.federation.rounds * training.epochs,
                                           batch_size=training.batch_size, learning_rate=training.learning_rate,
                                           seed=training.seed),
                   dp=sim.privacy.required, epsilon=sim.privacy.epsilon, delta=sim.privacy.delta,
                   positive_class=sim.positive_class)


def score(head: nn.Module, plan: BaselinePlan, layout: SimLayout, folder: Path) -> dict:
    """Save ``head`` as a checkpoint with its model card and score it like a federated model
    (``evaluate_checkpoint``): the same test items, the same code."""
    card = {"model": plan.model.as_dict(), "classes": list(plan.classes), "sequence_length": plan.sequence_length,
            "positive_class": plan.positive_class}
    checkpoint = save_checkpoint(folder, 0, model_arrays(head), card, best=False)
    metrics = evaluate_checkpoint(checkpoint, layout)
    return {key: metrics[key] for key in FINAL_METRICS if metrics.get(key) is not None}


def train_baseline(site_config: Path, plan: BaselinePlan, out_dir: Path) -> tuple[nn.Module, float | None]:
    """One model on one site.yaml's cached training items, in one run of the plan's epochs (DP-SGD
    under a ledger of its own in ``out_dir`` when the plan says so); the model and the ε it spent."""
    config = load_site_config(site_config)
    cache = FeatureCache(config.features.cache_dir)
    train, classes = load_split(cache, "train")
    if tuple(classes) != plan.classes:
        raise UserError(f"{cache.index_path}: the site's classes {classes} differ from the experiment's "
                        f"{list(plan.classes)}")
    if not train:
        raise UserError(f"{cache.index_path}: no training item")
    privacy = PrivacyConfig(enabled=plan.dp, epsilon=plan.epsilon, delta=min(config.privacy.delta, plan.delta),
                            accountant=config.privacy.accountant, max_grad_norm=config.privacy.max_grad_norm)
    torch.manual_seed(plan.training.seed)
    head = build_head(plan.model, len(plan.classes), config.features.backbone_weights)
    result = train_round(head, PatientSequences(train, plan.sequence_length, plan.training.seed), plan.training,
                         privacy, Path(out_dir) / "privacy_ledger.json", round_id="baseline", progress=False)
    return head, result.epsilon


def centralised(layout: SimLayout, plan: BaselinePlan, out_dir: Path) -> dict:
    """Every site's training data in one place: the upper reference for the federation."""
    head, epsilon = train_baseline(layout.pooled_config, plan, out_dir)
    return {**score(head, plan, layout, out_dir), "epsilon": epsilon}


def local_only(layout: SimLayout, plan: BaselinePlan, out_dir: Path) -> dict:
    """Each site alone: the mean over sites of each metric, the largest ε, and every site's metrics.

    A site that cannot train alone (no training item left after the split) is listed with the
    reason and left out of the mean.
    """
    per_site: dict[str, dict] = {}
    for path in layout.site_configs:
        name = load_site_config(path).name
        try:
            head, epsilon = train_baseline(path, plan, out_dir / name)
        except UserError as exc:
            log.warning("local-only baseline: %s cannot train alone: %s", name, exc)
            per_site[name] = {"skipped": str(exc)}
            continue
        per_site[name] = {**score(head, plan, layout, out_dir / name), "epsilon": epsilon}
    trained = [m for m in per_site.values() if "skipped" not in m]
    if not trained:
        raise UserError("local-only baseline: no site could train on its own data")
    mean = {key: float(np.nanmean([m.get(key, np.nan) for m in trained])) for key in FINAL_METRICS
            if any(np.isfinite(m.get(key, np.nan)) for m in trained)}
    epsilons = [m["epsilon"] for m in trained if m["epsilon"] is not None]
    return {**mean, "epsilon": max(epsilons) if epsilons else None, "per_site": per_site}
