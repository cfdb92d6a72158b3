"""simulations.membership_inference: the loss-threshold attack's AUC at its two extremes, and on a head."""

import numpy as np
import pytest
import torch

from client.sequence_data import SlideFeatures
from shared.model import SequenceHead
from simulations.membership_inference import attack_auc, item_losses, item_margins, mean_auc_interval, membership_attack


def test_perfectly_separating_losses_give_auc_one():
    members = np.array([0.01, 0.02, 0.05, 0.1])
    non_members = np.array([0.5, 0.9, 1.3])
    assert attack_auc(members, non_members) == 1.0
    assert attack_auc(non_members, members) == 0.0  # members with the higher loss: the attack is always wrong


def test_identical_distributions_give_auc_one_half():
    rng = np.random.default_rng(0)
    losses = rng.exponential(0.5, size=4000)
    assert attack_auc(losses[:2000], losses[2000:]) == pytest.approx(0.5, abs=0.03)
    assert attack_auc(np.full(5, 0.3), np.full(7, 0.3)) == 0.5  # ties count one half


def test_mean_auc_interval_over_seeds():
    rng = np.random.default_rng(1)
    chance = [(rng.exponential(0.5, 200), rng.exponential(0.5, 200)) for _ in range(3)]
    mean, low, high = mean_auc_interval(chance)
    assert mean == pytest.approx(np.mean([attack_auc(a, b) for a, b in chance]))
    # Three runs of 200 + 200: the mean's standard error is about 0.029 / sqrt(3), so the 95 % interval
    # spans about 0.066 around the mean.
    assert low < mean < high and 0.04 < high - low < 0.1
    assert low < 0.5 < high
    _, one_low, one_high = mean_auc_interval(chance[:1])
    assert one_high - one_low > 1.4 * (high - low)  # one run alone: about sqrt(3) times wider
    assert mean_auc_interval(chance) == (mean, low, high)  # seeded resampling

    leaky = [(rng.exponential(0.1, 50), rng.exponential(1.0, 50)) for _ in range(3)]
    mean, low, high = mean_auc_interval(leaky)
    assert 0.85 < low <= mean <= high <= 1.0
    with pytest.raises(ValueError, match="members and non-members"):
        mean_auc_interval([(np.ones(3), np.array([]))])


def _items(rng, count, offset):
    return [SlideFeatures(f"item-{offset + i}", f"p{offset + i}", i % 2,
                          rng.normal(size=(6, 32)).astype(np.float32)) for i in range(count)]


def test_attack_on_a_memorising_head():
    """A head trained to memorise random items: its members have low loss, fresh items do not."""
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    members, non_members = _items(rng, 16, 0), _items(rng, 16, 100)
    head = SequenceHead(2, "mean", input_dim=32, projection=64)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.01)
    windows = torch.from_numpy(np.stack([m.features[:4] for m in members]))
    labels = torch.tensor([m.label for m in members])
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(windows), labels).backward()
        optimizer.step()
    result = membership_attack(head, members, non_members, length=4)
    assert result.members == result.non_members == 16
    assert result.member_loss < result.non_member_loss
    assert result.auc > 0.9
    losses = item_losses(head, members, 4)
    assert losses.shape == (16,) and np.all(losses >= 0)
    inside, outside = item_margins(head, members, 4), item_margins(head, non_members, 4)
    assert attack_auc(-inside, -outside) > 0.9  # the margin attack finds the members too


class _Confident(torch.nn.Module):
    """Logits (0, 10 * mean of the window): every item is class 1 with a float32 probability of exactly 1."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(10.0))

    def forward(self, windows):
        strength = self.scale * windows.mean(dim=(1, 2))
        return torch.stack([torch.zeros_like(strength), strength], dim=1)


def test_the_margin_ranks_what_the_saturated_loss_ties():
    """Members more confident than non-members, all with loss exactly 0 in float32: the loss attack
    sees chance (ties), the margin attack sees every member."""
    def item(name, level):
        return SlideFeatures(name, name, 1, np.full((4, 8), level, dtype=np.float32))

    members = [item(f"m{i}", 5.0 + i / 10) for i in range(5)]  # logits 50-54
    non_members = [item(f"n{i}", 4.0 + i / 10) for i in range(5)]  # logits 40-44
    head = _Confident()
    losses_in, losses_out = item_losses(head, members, 4), item_losses(head, non_members, 4)
    assert not losses_in.any() and not losses_out.any()
    assert attack_auc(losses_in, losses_out) == 0.5
    margins_in, margins_out = item_margins(head, members, 4), item_margins(head, non_members, 4)
    np.testing.assert_allclose(margins_out, [40, 41, 42, 43, 44], rtol=1e-6)
    assert attack_auc(-margins_in, -margins_out) == 1.0
    with pytest.raises(ValueError, match="non-members"):
        membership_attack(head, members, [], length=4)
