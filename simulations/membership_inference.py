"""A loss-threshold membership-inference attack (Yeom et al., 2018) against a trained head.

The attacker holds the model and a labelled item and says "it was in training" when the model's
loss on it is low. Its score is therefore -loss, and the attack's ROC AUC over members (the
items the sites trained on) and non-members (held-out items of the same distribution) measures
what the released model gives away about who took part: 0.5 is chance, 1 a perfect attack.
DP-SGD bounds it: at (ε, δ) no attack's true-positive rate exceeds e^ε times its false-positive
rate plus δ, so the AUC of a model trained under DP must stay near 0.5 where the data is small
enough for a non-private model to memorise it.

The loss saturates: a confident float32 model gives many items a probability of exactly 1, so a
loss of exactly 0, and the ties hide what the model learnt about them. ``item_margins`` is the
stronger score an attacker with the model would use instead (Carlini et al., 2022, "Membership
inference attacks from first principles"): the logit margin of the true class, log(p / (1 - p)),
computed in float64 from the head's logits, which does not saturate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.sequence_data import SlideFeatures, predict_slides, slide_windows
from client.trained_model import load_model
from shared.devices import module_device
from shared.metrics import PROB_CLIP, roc_auc
from simulations.materialise import SimLayout
from simulations.sim_runner import cached_items, trunk_of


@dataclass(frozen=True)
class AttackResult:
    auc: float  # ROC AUC of the score -loss, members against non-members
    members: int
    non_members: int
    member_loss: float  # mean cross-entropy of the members
    non_member_loss: float

    def as_dict(self) -> dict:
        return asdict(self)


def item_losses(head: nn.Module, items: list[SlideFeatures], length: int) -> np.ndarray:
    """Cross-entropy of each item under ``head`` (the item's prediction: the mean over its windows)."""
    probs = predict_slides(head, items, length)
    labels = np.array([item.label for item in items], dtype=np.int64)
    return -np.log(np.clip(probs[np.arange(len(items)), labels], PROB_CLIP, 1.0))


@torch.inference_mode()
def item_margins(head: nn.Module, items: list[SlideFeatures], length: int) -> np.ndarray:
    """Each item's logit margin of its true class, log(p_y / (1 - p_y)) = logit_y - logsumexp of the other
    logits, in float64 and averaged over the item's covering windows: the higher, the more "member"."""
    head.eval()
    device = module_device(head)
    margins = np.zeros(len(items))
    for index, item in enumerate(items):
        logits = head(slide_windows(item, length).to(device)).double().cpu()
        others = torch.cat([logits[:, :item.label], logits[:, item.label + 1:]], dim=1)
        margins[index] = float((logits[:, item.label] - torch.logsumexp(others, dim=1)).mean())
    return margins


def attack_auc(member_losses: np.ndarray, non_member_losses: np.ndarray) -> float:
    """The attack's ROC AUC: the chance a random member has a lower loss than a random non-member."""
    scores = -np.concatenate([np.asarray(member_losses, float), np.asarray(non_member_losses, float)])
    is_member = np.concatenate([np.ones(len(member_losses), bool), np.zeros(len(non_member_losses), bool)])
    return roc_auc(scores, is_member)


def membership_attack(head: nn.Module, members: list[SlideFeatures], non_members: list[SlideFeatures],
                      length: int) -> AttackResult:
    """Attack ``head`` with its own training items against held-out items of the same classes."""
    if not members or not non_members:
        raise ValueError(f"the attack needs members and non-members, got {len(members)} and {len(non_members)}")
    inside, outside = item_losses(head, members, length), item_losses(head, non_members, length)
    return AttackResult(attack_auc(inside, outside), len(inside), len(outside), float(inside.mean()),
                        float(outside.mean()))


def checkpoint_scores(checkpoint: Path, layout: SimLayout) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each member's and each non-member's score under a simulated federation's global model: members
    are the items the sites trained on, non-members the held-out test items (same source, same
    classes, never seen in training). ``"loss"``: their losses (``item_losses``); ``"margin"``: their
    negated logit margins (``item_margins``), so that ``attack_auc`` and ``mean_auc_interval`` take
    either as they are. The model and the items are loaded once for both."""
    model = load_model(Path(checkpoint), trunk_of(layout))
    members = [item for path in layout.site_configs for item in cached_items(path, "train", model.classes)]
    non_members = cached_items(layout.test_config, "test", model.classes)
    if not members or not non_members:
        raise ValueError(f"the attack needs members and non-members, got {len(members)} and {len(non_members)}")
    head, length = model.head, model.length
    return {"loss": (item_losses(head, members, length), item_losses(head, non_members, length)),
            "margin": (-item_margins(head, members, length), -item_margins(head, non_members, length))}


def attack_checkpoint(checkpoint: Path, layout: SimLayout) -> AttackResult:
    """Attack a simulated federation's global model (``checkpoint_scores``, the loss attack)."""
    inside, outside = checkpoint_scores(checkpoint, layout)["loss"]
    return AttackResult(attack_auc(inside, outside), len(inside), len(outside), float(inside.mean()),
                        float(outside.mean()))


def mean_auc_interval(runs: list[tuple[np.ndarray, np.ndarray]], level: float = 0.95, draws: int = 2000,
                      seed: int = 0) -> tuple[float, float, float]:
    """The attack AUC averaged over runs (seeds) and a bootstrap interval for that mean.

    Args:
        runs: per run, the members' and the non-members' losses.
        level: the interval's coverage, e.g. 0.95.
        draws: bootstrap draws; each resamples every run's members and non-members with
            replacement (each group on its own) and averages the runs' AUCs.
        seed: the resampling's seed: the same losses give the same interval.

    Returns (mean, low, high): the mean of the runs' AUCs and the percentile interval.
    """
    if not runs or any(len(inside) == 0 or len(outside) == 0 for inside, outside in runs):
        raise ValueError("every run needs members and non-members")
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    rng = np.random.default_rng(seed)
    means = np.zeros(draws)
    for inside, outside in runs:
        inside, outside = np.asarray(inside, float), np.asarray(outside, float)
        for draw in range(draws):
            means[draw] += attack_auc(rng.choice(inside, len(inside)), rng.choice(outside, len(outside)))
    means /= len(runs)
    mean = float(np.mean([attack_auc(inside, outside) for inside, outside in runs]))
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return mean, float(low), float(high)
