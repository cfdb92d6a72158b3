"""client.importance: Shapley values of tiles share out exactly the slide's probability above chance."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from client import importance, sequence_data
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
    margin = explanation.probabilities[explanation.explained] - 1 / len(explanation.probabilities)
    assert abs(margin) > 1e-3  # a slide the head does not score at chance: shares that are not all zero
    assert explanation.importance.sum() == pytest.approx(margin, abs=1e-5)


def test_sampled_orders_approximate_the_exact_values(monkeypatch):
    head, slide = _head(), _slide(12)
    exact = explain_slide(head, slide, length=6).importance
    monkeypatch.setattr(importance, "EXACT_PLAYERS", 3)  # force the sampled path for windows of 6
    sampled = explain_slide(head, slide, length=6).importance
    assert sampled.sum() == pytest.approx(exact.sum(), abs=1e-5)  # every order telescopes to the same total
    assert np.abs(sampled - exact).max() < 0.25 * np.abs(exact).max() + 1e-4
    assert np.array_equal(sampled, explain_slide(head, slide, length=6).importance)  # fixed seed: reruns agree


@pytest.mark.parametrize("grid", [False, True])
def test_chunked_head_calls_score_like_one_call(monkeypatch, grid):
    head, slide = _head(classes=3), _slide(23, positions=5 if grid else None)
    whole = explain_slide(head, slide, length=4)
    monkeypatch.setattr(importance, "CHUNK", 3)  # many chunks, the last one short
    monkeypatch.setattr(sequence_data, "WINDOWS_PER_CALL", 2)
    chunked = explain_slide(head, slide, length=4)
    np.testing.assert_allclose(chunked.probabilities, whole.probabilities, rtol=1e-6)
    np.testing.assert_allclose(chunked.importance, whole.importance, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(chunked.tile_probability, whole.tile_probability, rtol=1e-6)


# A fresh interpreter: the head of the default model, 7,000 tiles (a scanner-size slide at 0.5 µm/px).
# ru_maxrss is the process's peak so far, so the difference is what the explanation added on top.
EXPLAIN_PEAK = """
import resource, numpy as np, torch
from client.importance import explain_slide
from client.sequence_data import SlideFeatures
from shared.model import SequenceHead
torch.manual_seed(0)
head = SequenceHead(2, "rnn", input_dim=2048, projection=128, hidden=128)
features = np.random.default_rng(0).random((7000, 2048), dtype=np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
explain_slide(head, SlideFeatures("s", "p", -1, features), 8)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_explaining_a_scanner_size_slide_adds_little_memory():
    # Was +0.35-0.9 GB (a new gathered tensor per 1,024-sequence chunk fragmented glibc's heap), which took
    # predict of an 80,000 x 60,000 px slide past 2 GB; 0.06 GB with one buffer and 256-sequence chunks.
    added = int(subprocess.run([sys.executable, "-c", EXPLAIN_PEAK], capture_output=True, text=True, check=True,
                               cwd=os.getcwd(), timeout=600).stdout)
    assert added < 0.2e9
