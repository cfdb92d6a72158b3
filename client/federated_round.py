"""One federated round at a site: train on the global model under the ledger, or evaluate it.

The ClientApp (``client/app.py``) calls these in a fresh process per message. What they return
is what leaves the site: the update (new minus received parameters), the number of privacy
units, and numeric metrics. A site that cannot train this round (budget spent, another model,
DP off where the federation requires it) answers with a zero-weight reply and a numeric
refusal code (``shared.round_plan.REFUSALS``), so the round goes on without it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.feature_cache import CacheError, FeatureCache
from client.privacy_ledger import BudgetExceeded, LedgerError, PrivacyBudget, PrivacyLedger
from client.sequence_data import PatientSequences, SlideFeatures, load_split, predict_slides
from client.site_config import SiteConfig
from shared.metrics import classification_metrics
from shared.encoder import WeightsError, check_pinned
from shared.model import build_trainable
from shared.parameters import load_arrays, model_arrays, subtract, update_problem
from shared.round_plan import REFUSALS, RoundPlan
from shared.run_config import PrivacyConfig, TrainingConfig

log = logging.getLogger("fedpath.site")

FIT_METRICS = ("train_loss", "epsilon", "delta", "noise_multiplier", "refused", "would_spend", "budget_epsilon",
               "train_seconds")
"""Every fit reply carries exactly these keys (Flower needs the same keys from every site)."""


@dataclass(frozen=True)
class Reply:
    arrays: list[np.ndarray]
    examples: int
    metrics: dict[str, float]


class Refusal(Exception):
    def __init__(self, code: int, detail: str, **numbers: float) -> None:
        super().__init__(f"{REFUSALS[code]}: {detail}")
        self.code, self.numbers = code, numbers


def ledger_path(config: SiteConfig, plan: RoundPlan) -> Path:
    return Path(config.state_dir) / "ledgers" / f"{plan.federation_id}.json"


def round_privacy(config: SiteConfig, plan: RoundPlan) -> PrivacyConfig:
    """The consortium's target, capped by the site's own budget (a site never spends more than it allows)."""
    own = config.privacy
    return PrivacyConfig(enabled=own.enabled, epsilon=min(own.epsilon, plan.privacy.epsilon),
                         delta=min(own.delta, plan.privacy.delta), accountant=own.accountant,
                         max_grad_norm=own.max_grad_norm, planned_rounds=plan.planned_rounds)


def fit(config: SiteConfig, plan: RoundPlan, received: list[np.ndarray]) -> Reply:
    """Train the received global model for one round; the update and what it cost."""
    start = time.perf_counter()
    privacy = round_privacy(config, plan)
    try:
        if plan.privacy.required and not privacy.enabled:
            raise Refusal(3, "set privacy.enabled: true in site.yaml")
        train, _ = _site_split(config, plan, "train")
        if not train:
            raise Refusal(5, "no prepared training slides")
        head = _global_head(plan, received)
        path = ledger_path(config, plan)
        training = TrainingConfig(epochs=plan.epochs, batch_size=plan.batch_size, learning_rate=plan.learning_rate,
                                  seed=plan.seed * 100_003 + plan.round)
        dataset = PatientSequences(train, plan.sequence_length, training.seed)
        from client.private_training import train_round  # Opacus: only where training happens

        try:  # opening the ledger can refuse too (it was written for another budget, or is unreadable)
            round_id = PrivacyLedger(path, PrivacyBudget(privacy.epsilon, privacy.delta, privacy.accountant)) \
                .unused_round_id(f"round-{plan.round}") if privacy.enabled else f"round-{plan.round}"
            result = train_round(head, dataset, training, privacy, path, round_id, progress=False,
                                 proximal_mu=plan.proximal_mu)
        except BudgetExceeded as exc:
            raise Refusal(1, str(exc), epsilon=exc.spent, would_spend=exc.would_spend,
                          budget_epsilon=exc.budget.epsilon) from None
        except LedgerError as exc:
            raise Refusal(2, str(exc)) from None
        update = subtract(list(model_arrays(head).values()), received)
        problem = _outgoing_problem(plan, head, update, result.examples)
        if problem:  # the ledger recorded the round (privacy was spent), but nothing doubtful leaves
            raise Refusal(6, problem, epsilon=result.epsilon)
    except Refusal as refusal:
        log.warning("round %d: this site sits the round out: %s", plan.round, refusal)
        metrics = _fit_metrics(**{"refused": refusal.code, "budget_epsilon": privacy.epsilon, "delta": privacy.delta,
                                  "train_seconds": time.perf_counter() - start, **refusal.numbers})
        return Reply([np.zeros_like(a, dtype=np.float32) for a in received], 0, metrics)
    metrics = _fit_metrics(train_loss=result.loss, epsilon=result.epsilon, delta=result.delta,
                           noise_multiplier=result.noise_multiplier, budget_epsilon=privacy.epsilon,
                           train_seconds=time.perf_counter() - start)
    log.info("round %d: trained on %d patients, loss %.4f, ε spent %s", plan.round, result.examples, result.loss,
             "n/a (DP off)" if result.epsilon is None else f"{result.epsilon:.3f}")
    return Reply(update, result.examples, metrics)


def evaluate(config: SiteConfig, plan: RoundPlan, received: list[np.ndarray]) -> tuple[float, Reply]:
    """Metrics of the global model on this site's validation split (slides, not patients)."""
    num_classes = len(plan.classes)
    try:
        val, _ = _site_split(config, plan, "val")
    except Refusal as refusal:
        log.warning("round %d: this site does not evaluate: %s", plan.round, refusal)
        val = []
    metrics = {"accuracy": math.nan, "balanced_accuracy": math.nan, "sensitivity": math.nan,
               "specificity": math.nan, "auc": math.nan,
               **{f"cm_{i}_{j}": 0.0 for i in range(num_classes) for j in range(num_classes)},
               "epsilon": _epsilon_spent(config, plan)}
    if not val:
        return 0.0, Reply([], 0, metrics)
    head = _global_head(plan, received)
    probs = predict_slides(head, val, plan.sequence_length)
    result = classification_metrics(np.array([s.label for s in val]), probs, list(plan.classes), plan.positive_class)
    for key in ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc"):
        if key in result:
            metrics[key] = float(result[key])
    for i, row in enumerate(result["confusion_matrix"]):
        for j, count in enumerate(row):
            metrics[f"cm_{i}_{j}"] = float(count)
    return float(result["loss"]), Reply([], len(val), metrics)


def _outgoing_problem(plan: RoundPlan, head: torch.nn.Module, update: list[np.ndarray], examples: int) -> str | None:
    if plan.secagg_max_weight is not None and examples > plan.secagg_max_weight:
        return (f"{examples} patients exceed secure_aggregation.max_weight {plan.secagg_max_weight} at the server: "
                "the weighted sum would overflow")
    shapes = [(name, tuple(t.shape)) for name, t in head.state_dict().items()]
    return update_problem(shapes, update, plan.max_update_norm, plan.secagg_clipping_range)


def _fit_metrics(**values: float | None) -> dict[str, float]:
    """All FIT_METRICS keys, numbers only (a missing value is 0 for counts and nan otherwise)."""
    out = {}
    for key in FIT_METRICS:
        value = values.get(key)
        out[key] = float(0 if key == "refused" and value is None else math.nan if value is None else value)
    return out


def _global_head(plan: RoundPlan, received: list[np.ndarray]) -> torch.nn.Module:
    head = build_trainable(plan.model, len(plan.classes))  # last_block: the received arrays fill the block
    load_arrays(head, received)
    return head


def _site_split(config: SiteConfig, plan: RoundPlan, split: str) -> tuple[list[SlideFeatures], list[str]]:
    """The cached slides of ``split`` with labels renumbered into the federation's class order."""
    if plan.model.trunk_sha256 is not None:
        try:
            check_pinned(config.features.backbone_weights, plan.model.trunk_sha256)
        except WeightsError as exc:
            raise Refusal(7, str(exc)) from None
    cache = FeatureCache(config.features.cache_dir)
    try:
        index = cache.read_index()
    except CacheError as exc:  # no cache yet, or unreadable: the site must prepare first
        raise Refusal(5, str(exc)) from None
    if index.settings.get("grid") != (plan.model.mode == "grid"):
        raise Refusal(5, f"the cache was prepared for another model.mode than '{plan.model.mode}'")
    if index.settings.get("block_input", False) != (plan.model.trainable == "last_block"):
        raise Refusal(5, f"the cache was prepared for another model.trainable than '{plan.model.trainable}'; set it "
                         "in site.yaml and run `fedpath-site prepare`")
    if plan.model.trunk_sha256 is not None and index.backbone != plan.model.trunk_sha256:
        raise Refusal(5, "the cache was prepared with another trunk than the pinned one; run `fedpath-site prepare`")
    unknown = sorted(set(index.classes) - set(plan.classes))
    if unknown:
        raise Refusal(4, f"site classes {unknown} are not among the federation's {list(plan.classes)}")
    slides, classes = load_split(cache, split)
    renumber = [plan.classes.index(name) for name in classes]
    return [SlideFeatures(s.item_id, s.patient, renumber[s.label], s.features) for s in slides], list(plan.classes)


def _epsilon_spent(config: SiteConfig, plan: RoundPlan) -> float:
    privacy = round_privacy(config, plan)
    path = ledger_path(config, plan)
    if not (privacy.enabled and path.exists()):
        return math.nan
    try:
        return PrivacyLedger(path, PrivacyBudget(privacy.epsilon, privacy.delta, privacy.accountant)).recorded_epsilon()
    except LedgerError as exc:  # fit refuses (code 2) and says why; evaluation goes on without ε
        log.warning("round %d: ε spent unknown: %s", plan.round, exc)
        return math.nan
