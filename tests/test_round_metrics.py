"""server.round_metrics.pooled and shared.metrics.confusion_metrics against hand-computed numbers."""

import math

import numpy as np
import pytest

from server.round_metrics import SiteRound, confusion_from_metrics, pooled
from shared.metrics import confusion_metrics

CLASSES = ("adenoma", "adenocarcinoma")


def _sites() -> dict[str, SiteRound]:
    return {
        "a": SiteRound(examples=10, train_loss=0.4, epsilon=1.0, val_slides=8, val_loss=0.5,
                       eval={"auc": 0.9, "accuracy": 0.875}, confusion=np.array([[3.0, 1.0], [0.0, 4.0]])),
        "b": SiteRound(examples=30, train_loss=0.8, epsilon=2.0, val_slides=6, val_loss=1.0,
                       eval={"auc": 0.6, "accuracy": 0.5}, confusion=np.array([[1.0, 1.0], [2.0, 2.0]])),
        # no validation slides (and it sat the round out): ignored by every pooled number
        "c": SiteRound(examples=0, train_loss=5.0, refused=1, val_slides=0, val_loss=9.0,
                       eval={"auc": 0.1}, confusion=np.array([[0.0, 0.0], [0.0, 0.0]])),
    }


def test_pooled_counts_are_exact_and_auc_and_losses_weighted():
    result = pooled(_sites(), CLASSES, "adenocarcinoma")
    # summed confusion [[4, 2], [2, 6]]: 14 slides, 10 right
    assert result["accuracy"] == pytest.approx(10 / 14)
    assert result["sensitivity"] == pytest.approx(6 / 8)  # adenocarcinoma row
    assert result["specificity"] == pytest.approx(4 / 6)  # adenoma row
    assert result["balanced_accuracy"] == pytest.approx((6 / 8 + 4 / 6) / 2)
    assert result["auc"] == pytest.approx((0.9 * 8 + 0.6 * 6) / 14)  # weighted by val slides
    assert result["loss"] == pytest.approx((0.5 * 8 + 1.0 * 6) / 14)
    assert result["train_loss"] == pytest.approx((0.4 * 10 + 0.8 * 30) / 40)  # weighted by examples
    assert result["val_slides"] == 14 and result["examples"] == 40


def test_positive_class_decides_sensitivity_and_specificity():
    default = pooled(_sites(), CLASSES, None)  # the second class
    assert default["sensitivity"] == pytest.approx(6 / 8) and default["specificity"] == pytest.approx(4 / 6)
    swapped = pooled(_sites(), CLASSES, "adenoma")
    assert swapped["sensitivity"] == pytest.approx(4 / 6) and swapped["specificity"] == pytest.approx(6 / 8)
    assert swapped["accuracy"] == default["accuracy"]


def test_pooled_is_not_the_mean_of_site_accuracies():
    result = pooled(_sites(), CLASSES, None)
    assert result["accuracy"] != pytest.approx((0.875 + 0.5) / 2)


def test_nan_values_are_left_out_of_the_weighting():
    sites = _sites()
    sites["b"].eval["auc"] = math.nan  # one-class validation set: no AUC
    sites["b"].train_loss = math.nan
    result = pooled(sites, CLASSES, None)
    assert result["auc"] == pytest.approx(0.9)
    assert result["train_loss"] == pytest.approx(0.4)
    assert result["accuracy"] == pytest.approx(10 / 14)  # counts still pooled
    sites["a"].eval["auc"] = math.nan
    assert math.isnan(pooled(sites, CLASSES, None)["auc"])


def test_a_site_without_confusion_counts_is_not_evaluated():
    sites = _sites()
    sites["b"].confusion = None
    result = pooled(sites, CLASSES, None)
    assert result["val_slides"] == 8 and result["accuracy"] == pytest.approx(7 / 8)
    assert result["loss"] == pytest.approx(0.5) and result["auc"] == pytest.approx(0.9)


def test_no_sites_gives_nan_not_zero():
    result = pooled({}, CLASSES, None)
    for key in ("train_loss", "loss", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc"):
        assert math.isnan(result[key]), key
    assert result["val_slides"] == 0 and result["examples"] == 0
    only_refused = pooled({"c": _sites()["c"]}, CLASSES, None)
    assert math.isnan(only_refused["accuracy"]) and math.isnan(only_refused["train_loss"])


def test_three_classes_pool_accuracy_without_binary_keys():
    classes = ("a", "b", "c")
    sites = {"x": SiteRound(val_slides=5, confusion=np.array([[2.0, 0, 0], [0, 1, 1], [0, 0, 1]]),
                            eval={"auc": 0.7}, val_loss=1.0),
             "y": SiteRound(val_slides=5, confusion=np.array([[0.0, 1, 0], [0, 2, 0], [1, 0, 1]]),
                            eval={"auc": 0.9}, val_loss=2.0)}
    result = pooled(sites, classes, None)
    assert result["accuracy"] == pytest.approx(7 / 10)  # [[2,1,0],[0,3,1],[1,0,2]]
    assert result["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4 + 2 / 3) / 3)
    assert math.isnan(result["sensitivity"]) and math.isnan(result["specificity"])
    assert result["auc"] == pytest.approx(0.8) and result["loss"] == pytest.approx(1.5)


def test_confusion_from_metrics_reads_cm_keys():
    metrics = {"cm_0_0": 3.0, "cm_0_1": 1.0, "cm_1_0": 2.0, "cm_1_1": 4.0, "accuracy": 0.7}
    np.testing.assert_array_equal(confusion_from_metrics(metrics, 2), [[3, 1], [2, 4]])
    np.testing.assert_array_equal(confusion_from_metrics({"cm_2_1": 5.0}, 3), [[0, 0, 0], [0, 0, 0], [0, 5, 0]])


def test_site_entry_has_the_report_keys():
    entry = _sites()["a"].as_entry()
    assert entry["train_loss"] == 0.4 and entry["loss"] == 0.5 and entry["auc"] == 0.9
    assert entry["epsilon"] == 1.0 and entry["examples"] == 10 and entry["val_slides"] == 8
    assert math.isnan(entry["sensitivity"])  # not reported by the site: nan, not 0


# shared.metrics.confusion_metrics -------------------------------------------------------------------------------

def test_confusion_metrics_binary_by_hand():
    confusion = [[5, 1], [2, 2]]  # rows true, columns predicted
    result = confusion_metrics(confusion, ["neg", "pos"], "pos")
    assert result["n"] == 10.0
    assert result["accuracy"] == pytest.approx(0.7)
    assert result["sensitivity"] == pytest.approx(2 / 4)
    assert result["specificity"] == pytest.approx(5 / 6)
    assert result["balanced_accuracy"] == pytest.approx((5 / 6 + 2 / 4) / 2)
    flipped = confusion_metrics(confusion, ["neg", "pos"], "neg")
    assert flipped["sensitivity"] == pytest.approx(5 / 6) and flipped["specificity"] == pytest.approx(2 / 4)
    assert confusion_metrics(confusion, ["neg", "pos"])["sensitivity"] == pytest.approx(2 / 4)  # default: index 1


def test_confusion_metrics_three_classes_by_hand():
    result = confusion_metrics(np.array([[2, 1, 0], [0, 3, 1], [1, 0, 2]]), ["a", "b", "c"])
    assert result["n"] == 10.0 and result["accuracy"] == pytest.approx(0.7)
    assert result["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4 + 2 / 3) / 3)
    assert set(result) == {"n", "accuracy", "balanced_accuracy"}


def test_confusion_metrics_undefined_values_are_nan():
    one_class = confusion_metrics([[0, 0], [1, 3]], ["neg", "pos"])
    assert one_class["sensitivity"] == pytest.approx(0.75) and math.isnan(one_class["specificity"])
    assert one_class["balanced_accuracy"] == pytest.approx(0.75)  # the absent class is skipped
    empty = confusion_metrics(np.zeros((2, 2)), ["neg", "pos"])
    assert math.isnan(empty["accuracy"]) and math.isnan(empty["balanced_accuracy"])


def test_confusion_metrics_refuses_an_unknown_positive_class():
    with pytest.raises(ValueError, match="positive_class 'tumour' is not one of class_names"):
        confusion_metrics([[1, 0], [0, 1]], ["neg", "pos"], "tumour")
