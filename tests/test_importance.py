"""client.importance: Shapley values of tiles share out exactly the slide's probability above chance."""

import numpy as np
import pytest
import torch

from client import importance
from client.importance import explain_slide
from client.sequence_data import SlideFeatures, predict_slides
from shared.model import SequenceHead

DIM = 16


def _head(core="rnn", classes=2):
    torch.manual_seed(0)
    return SequenceHead(classes, core, input_dim=DIM, projection=8, hidden=4)


def _slide(tiles, positions=None, seed=0):
    shape = (tiles, DIM) if positions is None else (tiles, positions, DIM)
    return SlideFeatures("s", "p", 0, np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@pytest.mark.parametrize(("tiles", "length", "core"), [
    (20, 4, "rnn"),  # the last window overlaps its neighbour: those tiles are in two windows
    (16, 4, "mean"),
    (3, 5, "gru"),  # fewer tiles than a window: one window that wraps, a tile fills several steps
    (1, 4, "rnn"),
    (7, 1, "rnn"),  # windows of one tile
])
def test_importances_add_up_to_the_probability_above_chance(tiles, length, core):
    head, slide = _head(core, classes=3), _slide(tiles)
    explanation = explain_slide(head, slide, length)
    probabilities = predict_slides(head, [slide], length)[0]
    np.testing.assert_allclose(explanation.probabilities, probabilities)
    assert explanation.explained == int(np.argmax(probabilities)) == explanation.predicted
    assert explanation.importance.shape == (tiles,) and np.isfinite(explanation.importance).all()
    assert explanation.importance.sum() == pytest.approx(probabilities[explanation.explained] - 1 / 3, abs=1e-5)
    alone = torch.softmax(head(torch.from_numpy(slide.features)[:, None]), dim=-1)[:, explanation.explained]
    np.testing.assert_allclose(explanation.tile_probability, alone.detach().numpy(), rtol=1e-5)


def test_grid_mode_values_each_tile_by_its_own_map():
    head, slide = _head(), _slide(5, positions=6)
    explanation = explain_slide(head, slide, length=8, explained=1)
    own = torch.softmax(head(torch.from_numpy(slide.features)), dim=-1)[:, 1].detach().numpy()
    np.testing.assert_allclose(explanation.tile_probability, own, rtol=1e-5)
    np.testing.assert_allclose(explanation.importance, (own - 0.5) / 5, rtol=1e-5, atol=1e-7)


def test_a_tile_that_changes_nothing_gets_nothing():
    # Mean pooling of identical tiles: any subset scores the same, so every tile's share is equal
    # and they add up to the slide's margin over chance.
    head = _head("mean")
    vector = np.random.default_rng(1).normal(size=(1, DIM))
    slide = SlideFeatures("s", "p", 0, np.tile(vector, (8, 1)).astype(np.float32))
    explanation = explain_slide(head, slide, length=4)
    np.testing.assert_allclose(explanation.importance, explanation.importance[0], rtol=1e-5)


def test_sampled_orders_approximate_the_exact_values(monkeypatch):
    head, slide = _head(), _slide(12)
    exact = explain_slide(head, slide, length=6).importance
    monkeypatch.setattr(importance, "EXACT_PLAYERS", 3)  # force the sampled path for windows of 6
    sampled = explain_slide(head, slide, length=6).importance
    assert sampled.sum() == pytest.approx(exact.sum(), abs=1e-5)  # every order telescopes to the same total
    assert np.abs(sampled - exact).max() < 0.25 * np.abs(exact).max() + 1e-4
    assert np.array_equal(sampled, explain_slide(head, slide, length=6).importance)  # fixed seed: reruns agree
