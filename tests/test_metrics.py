"""shared.metrics against numbers computed by hand, edge cases and input validation."""

import itertools
import json
import math

import numpy as np
import pytest

from shared.metrics import classification_metrics, format_metric, roc_auc, to_jsonable

BINARY = ["benign", "tumour"]

# Binary example. P(tumour) per sample, arg-max predicts tumour when > 0.5:
#   y     0    0    1    1    1
#   p1    0.1  0.6  0.4  0.8  0.6
#   pred  0    1    0    1    1
# Confusion (rows true): [[1, 1], [1, 2]] -> accuracy 3/5, sensitivity 2/3, specificity 1/2,
# balanced accuracy (2/3 + 1/2) / 2 = 7/12.
# AUC over the 3 x 2 (positive, negative) pairs: 0.4>0.1 (1), 0.4<0.6 (0), 0.8>0.1 (1),
# 0.8>0.6 (1), 0.6>0.1 (1), 0.6=0.6 (1/2) -> 4.5 / 6 = 0.75.
# Loss: probabilities of the true class 0.9, 0.4, 0.4, 0.8, 0.6 -> -ln(0.9*0.4*0.4*0.8*0.6) / 5.
Y_BIN = np.array([0, 0, 1, 1, 1])
P1 = np.array([0.1, 0.6, 0.4, 0.8, 0.6])
PROBS_BIN = np.stack([1 - P1, P1], axis=1)

# Three-class example (classes a, b, c), arg-max in brackets:
#   y=0: [0.7 0.2 0.1] (a)   [0.3 0.4 0.3] (b)
#   y=1: [0.2 0.6 0.2] (b)   [0.1 0.3 0.6] (c)
#   y=2: [0.2 0.2 0.6] (c)   [0.5 0.1 0.4] (a)
# Confusion [[1,1,0],[0,1,1],[1,0,1]]: every recall 1/2, every precision 1/2 (each column
# holds 2), f1 1/2; each class has 4 negatives with one false positive -> specificity 3/4.
# One-vs-rest AUC: a: positives 0.7, 0.3 vs negatives 0.2 0.1 0.2 0.5 -> (4 + 3) / 8;
# b: 0.6, 0.3 vs 0.2 0.4 0.2 0.1 -> (4 + 3) / 8; c: 0.6, 0.4 vs 0.1 0.3 0.2 0.6 ->
# (3.5 + 3) / 8 (the tie at 0.6 counts 1/2). Macro (0.875 + 0.875 + 0.8125) / 3.
# Loss: -ln(0.7*0.3*0.6*0.3*0.6*0.4) / 6.
MULTI = ["a", "b", "c"]
Y_MULTI = np.array([0, 0, 1, 1, 2, 2])
PROBS_MULTI = np.array(
    [[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6], [0.2, 0.2, 0.6], [0.5, 0.1, 0.4]]
)


def test_binary_hand_computed():
    m = classification_metrics(Y_BIN, PROBS_BIN, BINARY)
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]
    assert m["positive_class"] == "tumour"
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["balanced_accuracy"] == pytest.approx(7 / 12)
    assert m["auc"] == pytest.approx(0.75)
    assert m["loss"] == pytest.approx(-math.log(0.9 * 0.4 * 0.4 * 0.8 * 0.6) / 5)
    assert m["n"] == 5
    assert "per_class" not in m


def test_binary_other_positive_class_swaps_sensitivity_and_specificity():
    m = classification_metrics(Y_BIN, PROBS_BIN, BINARY, positive_class="benign")
    assert m["positive_class"] == "benign"
    assert m["sensitivity"] == pytest.approx(1 / 2)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["auc"] == pytest.approx(0.75)  # AUC of P(benign) for benign: the same pairs, reversed


def test_multiclass_hand_computed():
    m = classification_metrics(Y_MULTI, PROBS_MULTI, MULTI)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["macro_sensitivity"] == pytest.approx(0.5)
    assert m["macro_specificity"] == pytest.approx(0.75)
    for name, auc in zip(MULTI, [0.875, 0.875, 0.8125], strict=True):
        stats = m["per_class"][name]
        expected = {"sensitivity": 0.5, "specificity": 0.75, "precision": 0.5, "f1": 0.5, "auc": auc}
        assert stats == pytest.approx(expected)
    assert m["auc"] == pytest.approx((0.875 + 0.875 + 0.8125) / 3)
    assert m["loss"] == pytest.approx(-math.log(0.7 * 0.3 * 0.6 * 0.3 * 0.6 * 0.4) / 6)
    assert "sensitivity" not in m and "positive_class" not in m


def test_perfect_predictions():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.0, 1.0], [1.0, 0.0]])
    m = classification_metrics(np.array([0, 1, 1, 0]), probs, BINARY)
    assert (m["accuracy"], m["balanced_accuracy"], m["auc"], m["sensitivity"], m["specificity"]) == (1, 1, 1, 1, 1)
    assert m["loss"] == pytest.approx(-(math.log(0.9) + math.log(0.8)) / 4)


def test_confident_mistake_gives_finite_loss():
    m = classification_metrics(np.array([1]), np.array([[1.0, 0.0]]), BINARY)
    assert m["loss"] == pytest.approx(-math.log(1e-15))


def test_one_class_present_leaves_undefined_values_nan():
    # Only tumours: sensitivity 2/3 is defined; specificity and AUC have no negatives.
    m = classification_metrics(np.array([1, 1, 1]), np.array([[0.2, 0.8], [0.7, 0.3], [0.4, 0.6]]), BINARY)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert math.isnan(m["specificity"]) and math.isnan(m["auc"])
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)  # mean over the classes present
    assert m["confusion_matrix"] == [[0, 0], [1, 2]]


def test_multiclass_absent_class_is_skipped_in_macro_averages():
    # Class c never occurs and is never predicted: its sensitivity, precision, f1 and AUC are
    # undefined; macro values average over a and b (recall 1/2 and 1).
    y = np.array([0, 0, 1])
    probs = np.array([[0.6, 0.3, 0.1], [0.3, 0.5, 0.2], [0.2, 0.7, 0.1]])
    m = classification_metrics(y, probs, MULTI)
    c = m["per_class"]["c"]
    assert all(math.isnan(c[key]) for key in ("sensitivity", "precision", "f1", "auc"))
    assert c["specificity"] == 1.0
    assert m["macro_sensitivity"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    # a: positives 0.6, 0.3 vs negative 0.2 -> 1; b: positive 0.7 vs 0.3, 0.5 -> 1.
    assert m["auc"] == pytest.approx(1.0)


def test_f1_is_zero_when_a_present_class_is_predicted_but_never_right():
    # Class a: 1 true sample, predicted once but on a b sample -> precision 0, recall 0, f1 0.
    y = np.array([0, 1, 2])
    probs = np.array([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    stats = classification_metrics(y, probs, MULTI)["per_class"]["a"]
    assert (stats["precision"], stats["sensitivity"], stats["f1"]) == (0.0, 0.0, 0.0)


def test_all_scores_tied_give_auc_one_half():
    m = classification_metrics(np.array([0, 1, 0, 1]), np.full((4, 2), 0.5), BINARY)
    assert m["auc"] == 0.5
    assert m["confusion_matrix"] == [[2, 0], [2, 0]]  # arg-max tie goes to the first class


def test_auc_matches_pair_counting_with_ties():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(60), 1)  # rounding makes many ties
    is_positive = rng.random(60) < 0.4
    pos, neg = scores[is_positive], scores[~is_positive]
    expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])
    assert roc_auc(scores, is_positive) == pytest.approx(expected)


def test_to_jsonable_turns_nan_into_none_for_strict_json():
    m = classification_metrics(np.array([1, 1]), np.array([[0.3, 0.7], [0.6, 0.4]]), BINARY)
    with pytest.raises(ValueError):
        json.dumps(m, allow_nan=False)
    clean = json.loads(json.dumps(to_jsonable(m), allow_nan=False))
    assert clean["auc"] is None and clean["specificity"] is None
    assert clean["sensitivity"] == 0.5
    assert to_jsonable({"x": np.float32(2.5), "y": np.int64(3), "z": [np.inf, (1, "s")]}) == {
        "x": 2.5,
        "y": 3,
        "z": [None, [1, "s"]],
    }


def test_float32_softmax_rows_are_accepted():
    logits = np.random.default_rng(1).normal(size=(50, 3)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = classification_metrics(np.arange(50) % 3, probs, MULTI)
    assert 0 <= m["auc"] <= 1


@pytest.mark.parametrize(
    "y, probs, names, positive, message",
    [
        (np.array([0, 1]), np.array([[0.5, 0.5]]), BINARY, None, r"probs has shape \(1, 2\) but must be .* = \(2, 2\)"),
        (np.array([0, 1]), np.full((2, 3), 1 / 3), BINARY, None, "one column per class"),
        (np.array([0, 2]), np.full((2, 2), 0.5), BINARY, None, r"labels outside 0..1 .*value 2 at index 1"),
        (np.array([-1, 0]), np.full((2, 2), 0.5), BINARY, None, "value -1 at index 0"),
        (np.array([0, 1]), np.array([[0.5, 0.5], [0.5, 0.6]]), BINARY, None, "row 1 sums to 1.1"),
        (np.array([0, 1]), np.array([[2.0, -1.0], [0.5, 0.5]]), BINARY, None, "not logits"),
        (np.array([0, 1]), np.array([[np.nan, 0.5], [0.5, 0.5]]), BINARY, None, "finite"),
        (np.array([0.0, 1.0]), np.full((2, 2), 0.5), BINARY, None, "integer class indices"),
        (np.array([], dtype=int), np.zeros((0, 2)), BINARY, None, "non-empty"),
        (np.array([0]), np.array([[1.0]]), ["only"], None, "at least 2 classes"),
        (np.array([0, 1]), np.full((2, 2), 0.5), ["x", "x"], None, "unique"),
        (np.array([0, 1]), np.full((2, 2), 0.5), BINARY, "normal", "'normal' is not one of class_names"),
        (Y_MULTI, PROBS_MULTI, MULTI, "a", "only applies to binary"),
    ],
)
def test_invalid_input_is_rejected_with_a_clear_message(y, probs, names, positive, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(y, probs, names, positive_class=positive)


@pytest.mark.parametrize(
    "value, digits, text",
    [(0.12345, 3, "0.123"), (np.float32(0.5), 2, "0.50"), (7, 1, "7.0"), (None, 3, "n/a"), (math.nan, 3, "n/a"),
     (math.inf, 2, "n/a"), (True, 3, "n/a"), ("0.5", 3, "n/a")],
)
def test_format_metric_shows_missing_and_undefined_values_as_na(value, digits, text):
    assert format_metric(value, digits) == text
