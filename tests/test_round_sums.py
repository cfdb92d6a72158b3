"""shared.round_sums: what a reply vector carries, what the server reads from the sum of several, and the
pooled metrics from evaluation counts against exact per-slide metrics."""

import math

import numpy as np
import pytest

from shared.metrics import classification_metrics
from shared.round_sums import CountLayout, EvaluationCounts, binned_auc, decode_sum, encode_reply

CLASSES = ("adenoma", "adenocarcinoma")


def _binary(n: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    positive = np.clip(0.45 * labels + rng.normal(0.3, 0.2, n), 0, 1)
    return labels, np.stack([1 - positive, positive], axis=1)


def test_pooled_counts_give_exact_accuracy_sensitivity_specificity_and_auc_to_the_bin():
    """Three sites' counts summed equal the metrics of all their slides in one place (one slide per patient)."""
    layout = CountLayout(2, 10, 1)
    labels, probs = _binary(600, 0)
    parts = np.array_split(np.arange(600), 3)
    total = sum((EvaluationCounts.from_predictions(layout, probs[p], labels[p], [f"s{i}-{j}" for j in p])
                 for i, p in enumerate(parts)), EvaluationCounts.zeros(layout))
    pooled, exact = total.metrics(CLASSES, "adenocarcinoma"), classification_metrics(labels, probs, CLASSES,
                                                                                      "adenocarcinoma")
    for key in ("accuracy", "balanced_accuracy", "sensitivity", "specificity"):
        assert pooled[key] == pytest.approx(exact[key], abs=1e-12), key
    assert abs(pooled["auc"] - exact["auc"]) <= 1 / layout.bins  # ties within a bin count one half
    assert abs(pooled["auc"] - exact["auc"]) < 0.01
    assert pooled["val_patients"] == 600


def test_multiclass_counts_and_their_sensitivity():
    layout = CountLayout(3, 10)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    probs = rng.dirichlet([1, 1, 1], 300)
    probs[np.arange(300), labels] += 0.8
    probs /= probs.sum(axis=1, keepdims=True)
    counts = EvaluationCounts.from_predictions(layout, probs, labels, [str(i) for i in range(300)])
    exact = classification_metrics(labels, probs, ("a", "b", "c"))
    metrics = counts.metrics(("a", "b", "c"))
    assert metrics["accuracy"] == pytest.approx(exact["accuracy"]) and abs(metrics["auc"] - exact["auc"]) < 0.02
    assert layout.size == 9 + 3 * 3 * 10 and layout.sensitivity == pytest.approx(2.0)
    assert CountLayout(2, 10).sensitivity == 1.0 and CountLayout(2, 10).size == 20


def test_a_patient_weighs_one_whatever_its_slides():
    """A patient with three slides moves every count by at most 1 in total: the release's L2 sensitivity."""
    layout = CountLayout(2, 10, 1)
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9], [0.7, 0.3]])
    with_patient = EvaluationCounts.from_predictions(layout, probs, [1, 1, 1, 0], ["p", "p", "p", "q"])
    without = EvaluationCounts.from_predictions(layout, probs[3:], [0], ["q"])
    change = with_patient.vector() - without.vector()
    assert np.abs(change).sum() == pytest.approx(1.0) and np.linalg.norm(change) <= layout.sensitivity
    assert with_patient.patients == pytest.approx(2.0)


def test_reply_vectors_sum_to_the_patient_weighted_mean_update():
    layout, scale = CountLayout(2, 10, 1), 100
    updates = [[np.full((2, 3), 0.5, np.float32), np.full(3, -0.2, np.float32)],
               [np.full((2, 3), -0.1, np.float32), np.full(3, 0.4, np.float32)]]
    counts = [np.arange(layout.size, dtype=float), np.ones(layout.size)]
    replies = [encode_reply(u, n, c, scale) for u, n, c in zip(updates, (30, 10), counts, strict=True)]
    assert all(np.abs(a).max() <= 1.0 for reply in replies for a in reply)  # inside SecAgg+'s clipping range
    assert [a.shape for a in replies[0]] == [(6 + 3 + 1 + layout.size,)]  # one vector on the wire
    read = decode_sum([a + b for a, b in zip(*replies, strict=True)], layout, scale, [(2, 3), (3,)])
    assert read.patients == pytest.approx(40, abs=1e-4)
    np.testing.assert_allclose(read.update[0], np.full((2, 3), (30 * 0.5 - 10 * 0.1) / 40), atol=1e-6)
    np.testing.assert_allclose(read.update[1], np.full(3, (30 * -0.2 + 10 * 0.4) / 40), atol=1e-6)
    np.testing.assert_allclose(read.evaluation.vector(), counts[0] + counts[1], atol=1e-4)
    nobody = decode_sum(encode_reply([np.zeros((2, 3)), np.zeros(3)], 0, np.zeros(layout.size), scale), layout, scale,
                        [(2, 3), (3,)])
    assert nobody.update is None and nobody.patients == 0
    with pytest.raises(ValueError, match="disagree on classes or evaluation bins"):
        decode_sum(replies[0], CountLayout(3, 10), scale, [(2, 3), (3,)])
    with pytest.raises(ValueError, match="received 30 values, a reply has 31 in 3 tensors"):
        decode_sum(replies[0], layout, scale, [(2, 3), (4,)])  # another model


def test_noisy_counts_read_as_zero_below_zero_and_auc_edges():
    layout = CountLayout(2, 4, 1)
    noisy = EvaluationCounts.from_vector(layout, np.array([-3.0, 1, 0, 0, 0, 0, 2, -1.0]))
    metrics = noisy.metrics(CLASSES, "adenocarcinoma")
    assert metrics["sensitivity"] == 1.0 and metrics["specificity"] == 1.0 and metrics["auc"] == 1.0
    assert math.isnan(binned_auc(np.zeros(4), np.ones(4)))
    assert binned_auc(np.array([0, 1, 0, 0]), np.array([0, 1, 0, 0])) == 0.5
    with pytest.raises(ValueError, match="even number"):
        CountLayout(2, 5)
