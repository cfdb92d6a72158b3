"""Classification metrics for slide-level predictions, as plain numbers for reports and JSON.

Pure numpy so that the server, the sites and the benchmarks compute the same numbers
without scikit-learn. Values that are undefined for the data at hand (AUC when only one
class is present, the specificity of a class that is never absent, ...) are
``float('nan')`` rather than a made-up 0 or 1: a site with a one-class validation set
must not report a perfect or a useless AUC. ``json.dumps`` would write nan as the
non-standard ``NaN``, so pass results through :func:`to_jsonable` before writing JSON.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PROB_CLIP = 1e-15
"""Probabilities are clipped to [PROB_CLIP, 1] before the log, so one confident mistake
gives a large but finite loss (-log(1e-15) ~ 34.5)."""

ROW_SUM_TOLERANCE = 1e-4
"""How far a row of ``probs`` may sum from 1 (float32 softmax is within ~1e-6)."""


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    positive_class: str | None = None,
) -> dict[str, Any]:
    """Metrics of predicted class probabilities against integer labels.

    Args:
        y_true: shape (N,), integer labels in ``range(len(class_names))``.
        probs: shape (N, C), one probability row per sample (softmax output), C >= 2.
        class_names: the C class names, in the column order of ``probs``.
        positive_class: binary only: the class whose sensitivity, specificity and AUC
            are reported; default the class at index 1.

    Returns keys ``accuracy``, ``balanced_accuracy`` (mean recall over the classes present
    in ``y_true``), ``loss`` (mean cross-entropy), ``auc``, ``confusion_matrix`` (rows
    true, columns predicted; prediction is the arg-max) and ``n``; binary adds
    ``positive_class``, ``sensitivity`` and ``specificity``; multi-class adds
    ``per_class`` ({name: {sensitivity, specificity, precision, f1, auc}}),
    ``macro_sensitivity`` and ``macro_specificity``. Multi-class ``auc`` is the
    one-vs-rest macro average; it and the macro averages skip classes whose value is
    undefined (nan only if none is defined).
    """
    y_true, probs = _validated(y_true, probs, class_names)
    num_classes = len(class_names)
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (y_true, predicted), 1)

    per_class = {name: _one_vs_rest(confusion, i, probs[:, i], y_true == i) for i, name in enumerate(class_names)}
    recalls = [stats["sensitivity"] for stats in per_class.values()]
    metrics: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float(np.mean(predicted == y_true)),
        "balanced_accuracy": nanmean(recalls),
        "loss": float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], PROB_CLIP, 1.0)))),
        "confusion_matrix": confusion.tolist(),
    }
    if num_classes == 2:
        positive = positive_index(class_names, positive_class)
        stats = per_class[class_names[positive]]
        metrics.update(
            positive_class=class_names[positive],
            auc=stats["auc"],
            sensitivity=stats["sensitivity"],
            specificity=stats["specificity"],
        )
    else:
        if positive_class is not None:
            raise ValueError(
                f"positive_class={positive_class!r} only applies to binary problems, but there are "
                f"{num_classes} classes; leave it out (multi-class metrics are reported per class)."
            )
        metrics.update(
            auc=nanmean([stats["auc"] for stats in per_class.values()]),
            per_class=per_class,
            macro_sensitivity=nanmean(recalls),
            macro_specificity=nanmean([stats["specificity"] for stats in per_class.values()]),
        )
    return metrics


def confusion_metrics(confusion: np.ndarray, class_names: Sequence[str], positive_class: str | None = None
                      ) -> dict[str, float]:
    """Accuracy, balanced accuracy and (binary) sensitivity/specificity from a confusion matrix
    (rows true, columns predicted): what pooled counts from several sites allow, AUC excepted."""
    confusion = np.asarray(confusion, dtype=np.float64)
    total = float(confusion.sum())
    recalls = [safe_ratio(confusion[i, i], confusion[i].sum()) for i in range(len(class_names))]
    metrics = {"n": total, "accuracy": safe_ratio(float(np.trace(confusion)), total),
               "balanced_accuracy": nanmean(recalls)}
    if len(class_names) == 2:
        positive = positive_index(class_names, positive_class)
        negative = 1 - positive
        metrics.update(sensitivity=recalls[positive], specificity=recalls[negative])
    return metrics


def roc_auc(scores: np.ndarray, is_positive: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic: P(score of a positive > score of a negative),
    ties counting one half (average ranks). nan unless both groups are present."""
    num_pos = int(np.count_nonzero(is_positive))
    num_neg = len(is_positive) - num_pos
    if num_pos == 0 or num_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    ranks = (last_rank - (counts - 1) / 2.0)[inverse]
    rank_sum = float(ranks[is_positive].sum())
    return (rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg)


def to_jsonable(value: Any) -> Any:
    """A copy of ``value`` that ``json.dumps(..., allow_nan=False)`` accepts: nan and
    infinities become None, numpy scalars and arrays become Python numbers and lists."""
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def is_number(value: Any) -> bool:
    """True for a finite int or float (numpy scalars included), False for None, nan, bools and the rest."""
    try:
        return not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
    except TypeError:
        return False


def format_metric(value: Any, digits: int = 3) -> str:
    """A metric for people to read: ``digits`` decimals, or ``n/a`` when there is no number (None: not
    reported; nan: undefined for the data, see the module docstring)."""
    return f"{float(value):.{digits}f}" if is_number(value) else "n/a"


def _one_vs_rest(confusion: np.ndarray, index: int, scores: np.ndarray, is_positive: np.ndarray) -> dict[str, float]:
    true_pos = float(confusion[index, index])
    actual_pos = float(confusion[index].sum())
    predicted_pos = float(confusion[:, index].sum())
    actual_neg = float(confusion.sum()) - actual_pos
    true_neg = actual_neg - (predicted_pos - true_pos)
    sensitivity = safe_ratio(true_pos, actual_pos)
    precision = safe_ratio(true_pos, predicted_pos)
    if math.isnan(sensitivity) or math.isnan(precision):
        f1 = math.nan
    else:
        f1 = safe_ratio(2 * precision * sensitivity, precision + sensitivity, zero_over_zero=0.0)
    return {
        "sensitivity": sensitivity,
        "specificity": safe_ratio(true_neg, actual_neg),
        "precision": precision,
        "f1": f1,
        "auc": roc_auc(scores, is_positive),
    }


def _validated(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = len(class_names)
    if num_classes < 2:
        raise ValueError(f"class_names must name at least 2 classes, got {list(class_names)!r}.")
    if len(set(class_names)) != num_classes:
        raise ValueError(f"class_names must be unique, got {list(class_names)!r}.")
    if y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array of labels, got shape {y_true.shape}.")
    if y_true.dtype.kind not in "iu":
        raise ValueError(
            f"y_true must hold integer class indices, got dtype {y_true.dtype}; map class names to indices first."
        )
    if probs.shape != (len(y_true), num_classes):
        raise ValueError(
            f"probs has shape {probs.shape} but must be (len(y_true), len(class_names)) = "
            f"({len(y_true)}, {num_classes}): one probability row per label, one column per class."
        )
    bad = np.flatnonzero((y_true < 0) | (y_true >= num_classes))
    if bad.size:
        raise ValueError(
            f"y_true has labels outside 0..{num_classes - 1} (class_names {list(class_names)!r}): "
            f"value {y_true[bad[0]]} at index {bad[0]} ({bad.size} such labels)."
        )
    if not np.all(np.isfinite(probs)) or probs.min() < -ROW_SUM_TOLERANCE or probs.max() > 1 + ROW_SUM_TOLERANCE:
        raise ValueError("probs must be finite probabilities in [0, 1]; pass softmax(logits), not logits.")
    row_sums = probs.sum(axis=1)
    bad = np.flatnonzero(np.abs(row_sums - 1.0) > ROW_SUM_TOLERANCE)
    if bad.size:
        raise ValueError(
            f"every row of probs must sum to 1 (within {ROW_SUM_TOLERANCE}); row {bad[0]} sums to "
            f"{row_sums[bad[0]]:.6g} ({bad.size} such rows). Pass softmax(logits) over all classes."
        )
    return y_true.astype(np.int64), probs


def positive_index(class_names: Sequence[str], positive_class: str | None) -> int:
    if positive_class is None:
        return 1
    if positive_class not in class_names:
        raise ValueError(f"positive_class {positive_class!r} is not one of class_names {list(class_names)!r}.")
    return list(class_names).index(positive_class)


def safe_ratio(numerator: float, denominator: float, zero_over_zero: float = math.nan) -> float:
    return float(numerator / denominator) if denominator else zero_over_zero


def nanmean(values: Sequence[float]) -> float:
    defined = [value for value in values if not math.isnan(value)]
    return float(np.mean(defined)) if defined else math.nan
