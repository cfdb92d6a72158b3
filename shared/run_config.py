"""How a model is trained: local optimisation and the privacy budget (used by sites and server)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shared.yaml_config import at_least, check, folder_rule, positive

DISCLOSABLE = ("epsilon", "delta", "refused", "would_spend", "budget_epsilon", "noise_multiplier", "train_seconds")
"""Per-site numbers a hospital may list in `disclose:`, each a plain number beside its masked vector:
the site's config checks its list against these, the server reads no other."""


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = check(at_least(1), 5)  # local epochs (per round, once federated)
    batch_size: int = check(at_least(1), 16)  # expected slides per step (Poisson sampling under DP)
    learning_rate: float = check(positive, 1e-3)
    seed: int = 0
    positive_class: str | None = None  # binary metrics: sensitivity/specificity of this class
    out_dir: Path | None = check(folder_rule, None)  # train-local output; default: runs/local beside site.yaml


@dataclass(frozen=True)
class PrivacyConfig:
    """The site's (ε, δ) for the whole federation. DP can only be turned off explicitly."""

    enabled: bool = True
    epsilon: float = check(positive, 8.0)
    delta: float = check(lambda d: None if 0 < d < 1 else "must be between 0 and 1 (exclusive)", 1e-5)
    accountant: Literal["rdp", "prv"] = "rdp"
    max_grad_norm: float = check(positive, 1.0)  # per-patient gradient clipping bound (the privacy unit)
    planned_rounds: int = check(at_least(1), 1)  # rounds the budget must last (noise is chosen for all of them)
    # The site's limit over all federations on the same data (every ledger in state/ledgers composed in one
    # accountant); a federation whose plan would exceed it is refused before training. None: no lifetime limit.
    lifetime_epsilon: float | None = check(lambda e: None if e is None or e > 0 else "must be > 0", None)
    # Release noisy evaluation counts of the models the server sends (charged to the ledger). false: this site
    # never evaluates for the federation and its whole budget goes to training.
    release_evaluation: bool = True
