"""A round's numbers: each site's, and the federation's pooled over sites.

Sites send their validation confusion counts, so pooled accuracy, sensitivity and
specificity are exact (as if the validation slides were in one place). AUC needs the
scores themselves, which never leave a site: the pooled AUC is the mean of the sites'
AUCs weighted by validation slides, an approximation stated in docs/federation.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from shared.metrics import confusion_metrics

EVAL_KEYS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc")


@dataclass
class SiteRound:
    """What one site reported in a round (fit and evaluate)."""

    examples: int = 0  # training patients (0: did not train)
    train_loss: float = math.nan
    epsilon: float = math.nan
    delta: float = math.nan
    refused: int = 0  # the site's own refusal code (shared/round_plan.py REFUSALS)
    rejected: str | None = None  # why the server set the site's update aside
    would_spend: float = math.nan
    budget_epsilon: float = math.nan
    train_seconds: float = math.nan
    val_slides: int = 0
    val_loss: float = math.nan
    eval: dict[str, float] = field(default_factory=dict)
    confusion: np.ndarray | None = None

    def as_entry(self) -> dict[str, float]:
        return {"train_loss": self.train_loss, "loss": self.val_loss, **{k: self.eval.get(k, math.nan)
                                                                        for k in EVAL_KEYS},
                "epsilon": self.epsilon, "examples": self.examples, "val_slides": self.val_slides}


def confusion_from_metrics(metrics: dict, num_classes: int) -> np.ndarray:
    return np.array([[float(metrics.get(f"cm_{i}_{j}", 0.0)) for j in range(num_classes)]
                     for i in range(num_classes)])


def pooled(sites: dict[str, SiteRound], classes: tuple[str, ...], positive_class: str | None) -> dict[str, float]:
    """The federation's metrics of the round: exact from pooled counts, AUC and losses weighted."""
    evaluated = [s for s in sites.values() if s.val_slides > 0 and s.confusion is not None]
    trained = [s for s in sites.values() if s.examples > 0]
    result = {key: math.nan for key in ("train_loss", "loss", *EVAL_KEYS)}
    if trained:
        result["train_loss"] = _weighted([(s.train_loss, s.examples) for s in trained])
    if evaluated:
        counts = sum(s.confusion for s in evaluated)
        result.update({k: v for k, v in confusion_metrics(counts, classes, positive_class).items() if k in EVAL_KEYS})
        result["loss"] = _weighted([(s.val_loss, s.val_slides) for s in evaluated])
        result["auc"] = _weighted([(s.eval.get("auc", math.nan), s.val_slides) for s in evaluated])
    result["val_slides"] = sum(s.val_slides for s in evaluated)
    result["examples"] = sum(s.examples for s in trained)
    return result


def _weighted(pairs: list[tuple[float, int]]) -> float:
    pairs = [(v, w) for v, w in pairs if v is not None and not math.isnan(v) and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan
