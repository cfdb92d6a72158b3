"""One federated round at a site: score the received model, train it under the ledger, reply.

The ClientApp (``client/app.py``) calls :func:`fit` for every training message. What it returns is
what leaves the site, and it is built so that the server can only read it summed over sites
(``shared/round_sums.py``): one vector holding the patient-weighted update, the number of
training patients, and noisy evaluation counts of the model the site received (a private release,
charged to the site's ledger), plus in plain form only the per-site numbers the hospital lists in
``disclose:`` (by default its ε spent and its refusal code). The plaintext weight of every reply is
the same constant, so nothing about the site's size leaves beside the masked sum.

Everything else (training loss, the exact validation metrics, patient counts) stays at the site:
its log and its local round records (``client/site_rounds.py``). A site that cannot take part this
round (budget spent, another model, DP off where the federation requires it) answers with zeros
and a numeric refusal code (``shared.refusals.REFUSALS``), so the round goes on without it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from client.feature_cache import CacheError, FeatureCache
from client.privacy_ledger import (
    EVALUATION_SUFFIX,
    BudgetExceeded,
    LedgerError,
    LifetimeBudgetExceeded,
    PrivacyLedger,
    federation_ledger,
)
from client.sequence_data import PatientSequences, SlideFeatures, load_split, predict_slides
from client.site_config import SiteConfig
from client.site_rounds import keep_reply, record_round
from shared.devices import resolve_device
from shared.encoder import WeightsError, check_pinned
from shared.metrics import classification_metrics
from shared.model import build_trainable
from shared.parameters import load_arrays, model_arrays, subtract, unpack, update_problem
from shared.refusals import BUDGET_REFUSAL, REFUSALS
from shared.round_plan import RoundPlan
from shared.round_sums import CountLayout, EvaluationCounts, encode_reply
from shared.run_config import PrivacyConfig, TrainingConfig

log = logging.getLogger("fedpath.site")


@dataclass(frozen=True)
class Reply:
    arrays: list[np.ndarray]
    examples: int  # the plaintext weight: the same constant for every site (RoundPlan.weight_scale)
    metrics: dict[str, float]  # only the disclosed values
    refused: int | None = None  # why the site sits the round out (its metric `refused` only if disclosed)


class Refusal(Exception):
    def __init__(self, code: int, detail: str, **numbers: float) -> None:
        super().__init__(f"{REFUSALS[code]}: {detail}")
        self.code, self.numbers = code, numbers


def ledger_path(config: SiteConfig, plan: RoundPlan) -> Path:
    # federation_id was validated when the plan was parsed: a plain file name, never a path.
    return federation_ledger(config.state_dir, plan.federation_id)


def round_privacy(config: SiteConfig, plan: RoundPlan) -> PrivacyConfig:
    """The consortium's target, capped by the site's own budget (a site never spends more than it allows)."""
    own = config.privacy  # every other setting, present and future, stays the site's own
    return replace(own, epsilon=min(own.epsilon, plan.privacy.epsilon), delta=min(own.delta, plan.privacy.delta),
                   planned_rounds=plan.planned_rounds)


def fit(config: SiteConfig, plan: RoundPlan, received: list[np.ndarray], noise_seed: int | None = None,
        masked_evaluation: bool | None = None) -> Reply:
    """Score the received global model (when the plan asks), train it for one round, and build the reply.

    Args:
        config: the site's site.yaml.
        plan: what the server asks of this round (validated: a bad federation id never gets here).
        received: the global model's trainable tensors in the model's order, as the wire sends
            them (one vector, ``shared/parameters.pack``) or one array per tensor.
        noise_seed: only for a simulated site of a simulation that asked for reproducible noise;
            a deployed site always draws its noise from the operating system.
        masked_evaluation: None in a plain round (the site releases its evaluation counts as
            ``privacy.release_evaluation`` says). In a SecAgg+ round (``client/secure_round.py``): True when
            every site of the round offered its counts at setup, this one included, so it releases them or
            sits out (refusal 17; zeros would leave the others' sum to fewer sites); False when not every
            site did, so none releases.

    Returns:
        Reply: the reply arrays (``shared/round_sums.py``), the constant plaintext weight, and the
        disclosed numbers.
    """
    start = time.perf_counter()
    privacy = round_privacy(config, plan)
    layout = CountLayout.for_federation(plan.classes, plan.positive_class, plan.evaluation_bins)
    releases_evaluation = plan.evaluate and (config.privacy.release_evaluation if masked_evaluation is None
                                             else masked_evaluation)
    record: dict = {"round": plan.round, "train": plan.train, "evaluate": releases_evaluation}
    counts = np.zeros(layout.size)
    update = _no_update(plan, received)
    patients, numbers = 0, {}
    try:
        if plan.reproducible_noise and noise_seed is None:
            raise Refusal(15, "this is a deployed site; its noise is drawn from the operating system")
        if plan.privacy.required and not privacy.enabled:
            raise Refusal(3, "set privacy.enabled: true in site.yaml")
        device = resolve_device(config.features.device)
        train, val = _site_splits(config, plan, ("train", "val") if releases_evaluation else ("train",), [],
                                  device=None if device.type == "cpu" else device)
        if not train:  # also for the last, evaluation-only exchange: the noise plan is made from the training set
            raise Refusal(5, "no prepared training slides")
        if releases_evaluation and masked_evaluation and not (config.privacy.release_evaluation and val):
            raise Refusal(17, "it has no validation slides now, or privacy.release_evaluation is off")
        head, received = _global_head(plan, received, config.features.backbone_weights)
        head = head.to(device)
        update = _no_update(plan, received)  # its tensors now (the wire vector before)
        from client.private_training import PrivateRound  # Opacus: only where training happens

        training = TrainingConfig(epochs=plan.epochs, batch_size=plan.batch_size, learning_rate=plan.learning_rate)
        # The public seed picks which windows of a slide are drawn; DP noise and Poisson sampling do
        # not depend on it (private_training.private_generator).
        dataset = PatientSequences(train, plan.sequence_length, plan.seed * 100_003 + plan.round)
        try:
            session = PrivateRound(head, dataset, training, privacy, ledger_path(config, plan),
                                   evaluations=plan.evaluations if config.privacy.release_evaluation else 0,
                                   evaluation_share=plan.privacy.evaluation_share, noise_seed=noise_seed,
                                   lifetime_delta=config.privacy.delta,
                                   settings={"weight_scale": plan.weight_scale})
            round_id = f"round-{plan.round}"
            if session.ledger is not None:  # a retried round spends again, under its own id
                round_id = session.ledger.unused_round_id(round_id)
            session.check(round_id, train=plan.train, evaluation=bool(val))
            if val:
                exact = _evaluate(head, val, plan, layout)
                record["val"] = exact.pop("local")
                counts = session.release(exact["counts"].vector(), layout.sensitivity, f"{round_id}{EVALUATION_SUFFIX}")
            if plan.train:
                result = session.train(round_id, progress=False, proximal_mu=plan.proximal_mu)
                update = subtract(list(model_arrays(head).values()), received)
                patients = result.examples
                record.update(patients=patients, train_loss=result.loss, steps=result.steps)
                numbers.update(noise_multiplier=result.noise_multiplier)
        except LifetimeBudgetExceeded as exc:  # its numbers add up other federations: none of them leaves
            raise Refusal(11, str(exc)) from None
        except BudgetExceeded as exc:
            raise Refusal(BUDGET_REFUSAL, str(exc), epsilon=exc.spent, would_spend=exc.would_spend,
                          budget_epsilon=exc.budget.epsilon) from None
        except LedgerError as exc:
            raise Refusal(2, str(exc)) from None
        problem = _outgoing_problem(plan, head, update, patients) if plan.train else None
        if problem:  # the ledger recorded the round (privacy was spent), but nothing doubtful leaves
            raise Refusal(6, problem)
        numbers.update(epsilon=_epsilon_spent(session), delta=privacy.delta if privacy.enabled else None)
    except Refusal as refusal:
        log.warning("round %d: this site sits the round out: %s", plan.round, refusal)
        counts = np.zeros(layout.size)
        update = _no_update(plan, received)
        patients = 0
        numbers = {"refused": refusal.code, **refusal.numbers}
        record.update(refused=refusal.code, reason=str(refusal))
        if "epsilon" not in numbers:
            numbers["epsilon"] = _epsilon_spent_on_disk(config, plan, privacy)
    numbers.update(budget_epsilon=numbers.get("budget_epsilon", privacy.epsilon),
                   train_seconds=time.perf_counter() - start)
    arrays = encode_reply(update, patients, counts, plan.weight_scale, stats_range=plan.secagg_clipping_range)
    record.update({key: value for key, value in numbers.items() if value is not None})
    record_round(config, plan.federation_id, record)
    if config.federation.keep_sent_replies:
        keep_reply(config, plan.federation_id, plan.round, arrays)
    if not record.get("refused"):
        spent = "n/a (DP off)" if numbers.get("epsilon") is None else f"{numbers['epsilon']:.3f}"
        if plan.train:
            log.info("round %d: trained on %d patients, ε spent %s", plan.round, patients, spent)
        else:  # the run's last exchange only scores the final model
            log.info("round %d: scored the final model (no training), ε spent %s", plan.round, spent)
    return Reply(arrays, plan.weight_scale, disclosed(config, numbers), refused=record.get("refused"))


def disclosed(config: SiteConfig, numbers: dict[str, float | None]) -> dict[str, float]:
    """The numbers this site lists in ``disclose:`` (every listed key present, as a float; nan when unknown)."""
    out = {}
    for key in config.disclose:
        value = numbers.get(key)
        out[key] = float(0 if key == "refused" and value is None else math.nan if value is None else value)
    return out


def _evaluate(head: torch.nn.Module, val: list[SlideFeatures], plan: RoundPlan, layout: CountLayout) -> dict:
    """The received model on the validation slides: counts to release, and exact metrics kept here."""
    probs = predict_slides(head, val, plan.sequence_length)
    labels = np.array([s.label for s in val])
    counts = EvaluationCounts.from_predictions(layout, probs, labels, [s.patient for s in val])
    exact = classification_metrics(labels, probs, list(plan.classes), plan.positive_class)
    local = {key: float(exact[key]) for key in ("loss", "accuracy", "balanced_accuracy", "sensitivity",
                                                "specificity", "auc") if key in exact}
    return {"counts": counts, "local": {**local, "slides": len(val), "patients": len({s.patient for s in val})}}


def _no_update(plan: RoundPlan, received: list[np.ndarray]) -> list[np.ndarray]:
    """What a reply carries as update before (or instead of) training: zeros the size of the model;
    nothing in an exchange that does not train (the last one scores the final model: its replies
    carry only the counts, 84 bytes for two classes and ten bins instead of the model's megabytes)."""
    return [np.zeros_like(a, dtype=np.float32) for a in received] if plan.train else []


def _outgoing_problem(plan: RoundPlan, head: torch.nn.Module, update: list[np.ndarray], patients: int) -> str | None:
    if patients > plan.weight_scale:
        return (f"{patients} patients exceed secure_aggregation.max_weight {plan.weight_scale} at the server: "
                "the weighted sum would leave the secure aggregation range")
    shapes = [(name, tuple(t.shape)) for name, t in head.state_dict().items()]
    return update_problem(shapes, update, plan.max_update_norm, plan.secagg_clipping_range)


def _global_head(plan: RoundPlan, received: list[np.ndarray], trunk: str) -> tuple[torch.nn.Module, list[np.ndarray]]:
    """The model the plan names holding the received values, and those values as its tensors."""
    # last_block: the received arrays fill the block; a frozen projection comes from the site's (pinned) trunk
    try:
        head = build_trainable(plan.model, len(plan.classes), trunk=trunk)
    except WeightsError as exc:
        raise Refusal(7, str(exc)) from None
    tensors = unpack(received, [tuple(t.shape) for t in head.state_dict().values()], "the model the plan names")
    load_arrays(head, tensors)
    return head, tensors


def _site_splits(config: SiteConfig, plan: RoundPlan, splits: tuple[str, ...],
                 missing: list[SlideFeatures], device: torch.device | None = None) -> list[list[SlideFeatures]]:
    """The cached slides of each of ``splits`` with labels renumbered into the federation's class order
    (``missing`` for the rest of two); the trunk pin and the cache index are checked once for all.
    ``device``: a GPU that a warm worker keeps the vectors on (``sequence_data.load_split``)."""
    if config.features.backbone != plan.model.backbone:  # its vectors could not even enter the model
        raise Refusal(5, f"this site's features come from the {config.features.backbone} backbone, the federation's "
                         f"model reads {plan.model.backbone}: set features.backbone and run `fedpath-site prepare`")
    if plan.model.trunk_sha256 is not None:
        try:
            check_pinned(config.features.backbone_weights, plan.model.trunk_sha256, config.features.backbone)
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
    out = []
    for split in splits:
        slides, classes = load_split(cache, split, device)
        renumber = [plan.classes.index(name) for name in classes]
        out.append([SlideFeatures(s.item_id, s.patient, renumber[s.label], s.features) for s in slides])
    return out + [missing] * (2 - len(out))


def _epsilon_spent(session) -> float | None:
    return None if session.ledger is None else session.ledger.recorded_epsilon()


def _epsilon_spent_on_disk(config: SiteConfig, plan: RoundPlan, privacy: PrivacyConfig) -> float | None:
    """ε this federation's ledger recorded so far (for a refusal's report); None without DP or ledger."""
    from client.privacy_ledger import PrivacyBudget

    path = ledger_path(config, plan)
    if not (privacy.enabled and path.exists()):
        return None
    try:
        return PrivacyLedger(path, PrivacyBudget(privacy.epsilon, privacy.delta, privacy.accountant)).recorded_epsilon()
    except LedgerError as exc:
        log.warning("round %d: ε spent unknown: %s", plan.round, exc)
        return None
