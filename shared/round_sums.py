"""What a site's training reply carries: one vector that the server can only read summed over sites.

Under SecAgg+ the server recovers the (weighted) mean of the sites' vectors and nothing else, so
everything it needs from the sites in aggregate travels inside that one vector:

    [ patients · update / S  (every trainable tensor, flattened) | patients / S, evaluation counts / S ]

sent as one float32 array (``shared/parameters.pack``). An exchange that does not train (the last
one, which scores the final model) sends only the part after the bar.

Every site replies with the same plaintext weight (``S``, the consortium's ``max_weight``), so the
mean the server unmasks is the plain mean over the m sites that answered; ``m`` times it is the sum.
FedAvg's weighting by patients happens inside the vector (``patients · update``), and the sum of
``patients`` divides it out again. Sending ``x / S`` keeps every value within SecAgg+'s clipping
range (``patients <= S``) and at full quantisation precision (the weight ratio is 1).

The evaluation counts describe a model's predictions on the site's validation patients, each
patient carrying weight 1 spread over its slides: binary tasks send one histogram of the
positive-class score per true class (confusion counts follow from the 0.5 bin edge), multi-class
tasks send the confusion matrix and one histogram per class score. Summed over sites they give
the federation's accuracy, sensitivity and specificity exactly and its ROC AUC to the bin width;
each site adds calibrated Gaussian noise before they leave (``client/federated_round.py``), so
negative bins can occur and are read as zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from shared.metrics import confusion_metrics, nanmean, positive_index
from shared.parameters import ParameterMismatch, pack, unpack

DEFAULT_BINS = 10
"""Histogram bins over [0, 1]: AUC is exact to one bin's width (ties within a bin count one half)."""


@dataclass(frozen=True)
class CountLayout:
    """Shapes of the evaluation counts for ``num_classes`` classes and ``bins`` score bins."""

    num_classes: int
    bins: int = DEFAULT_BINS
    positive_index: int = 1  # binary: the class whose score is histogrammed

    @classmethod
    def for_federation(cls, classes: Sequence[str], positive_class: str | None, bins: int) -> "CountLayout":
        """The layout both sides use: the federation's classes, its positive class (default the second)."""
        return cls(len(classes), bins, positive_index(classes, positive_class))

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"need at least two classes, got {self.num_classes}")
        if self.bins < 2 or self.bins % 2:
            raise ValueError(f"bins must be an even number >= 2 (0.5 must be a bin edge), got {self.bins}")

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    @property
    def channels(self) -> int:
        """Score channels histogrammed: the positive class (binary) or every class."""
        return 1 if self.binary else self.num_classes

    @property
    def size(self) -> int:
        confusion = 0 if self.binary else self.num_classes ** 2
        return confusion + self.num_classes * self.channels * self.bins

    @property
    def sensitivity(self) -> float:
        """L2 norm by which one patient (weight 1 over its slides) can change the counts: 1 per histogram
        channel and 1 for the confusion matrix (each a set of weights summing to at most 1)."""
        return math.sqrt(self.channels + (0 if self.binary else 1))


@dataclass(frozen=True)
class EvaluationCounts:
    layout: CountLayout
    confusion: np.ndarray  # (C, C) rows true, columns predicted
    histograms: np.ndarray  # (C, channels, bins): true class x score channel x score bin

    @classmethod
    def zeros(cls, layout: CountLayout) -> "EvaluationCounts":
        c = layout.num_classes
        return cls(layout, np.zeros((c, c)), np.zeros((c, layout.channels, layout.bins)))

    @classmethod
    def from_predictions(cls, layout: CountLayout, probs: np.ndarray, labels: Sequence[int],
                         patients: Sequence[str]) -> "EvaluationCounts":
        """Counts of slide predictions ``probs`` (N, C) with true ``labels``; a patient's slides share weight 1."""
        probs = np.asarray(probs, dtype=np.float64)
        counts = cls.zeros(layout)
        slides_of: dict[str, int] = {}
        for patient in patients:
            slides_of[patient] = slides_of.get(patient, 0) + 1
        scored = [layout.positive_index] if layout.binary else range(layout.num_classes)
        for row, label, patient in zip(probs, labels, patients, strict=True):
            weight = 1.0 / slides_of[patient]
            counts.confusion[label, int(row.argmax())] += weight
            for channel, column in enumerate(scored):
                counts.histograms[label, channel, _bin(row[column], layout.bins)] += weight
        if layout.binary:  # sent as histograms only: derive what the server will derive
            counts = cls.from_vector(layout, counts.vector())
        return counts

    def vector(self) -> np.ndarray:
        parts = [self.histograms.ravel()] if self.layout.binary else [self.confusion.ravel(), self.histograms.ravel()]
        return np.concatenate(parts).astype(np.float64)

    @classmethod
    def from_vector(cls, layout: CountLayout, vector: np.ndarray) -> "EvaluationCounts":
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != (layout.size,):
            raise ValueError(f"evaluation counts: expected {layout.size} values, got shape {vector.shape}")
        c = layout.num_classes
        offset = 0 if layout.binary else c * c
        histograms = vector[offset:].reshape(c, layout.channels, layout.bins).copy()
        confusion = _binary_confusion(layout, histograms) if layout.binary else vector[:offset].reshape(c, c).copy()
        return cls(layout, confusion, histograms)

    def __add__(self, other: "EvaluationCounts") -> "EvaluationCounts":
        return EvaluationCounts.from_vector(self.layout, self.vector() + other.vector())

    @property
    def patients(self) -> float:
        """Validation patients counted (noisy when the counts are)."""
        return float(np.clip(self.histograms[:, 0, :], 0, None).sum())

    def metrics(self, classes: Sequence[str], positive_class: str | None = None) -> dict[str, float]:
        """accuracy, balanced_accuracy, auc, val_patients; binary adds sensitivity and specificity.
        Negative (noisy) counts are read as zero; undefined values are nan."""
        histograms = np.clip(self.histograms, 0, None)
        if self.layout.binary:
            confusion = _binary_confusion(self.layout, histograms)
        else:
            confusion = np.clip(self.confusion, 0, None)
        out = {**confusion_metrics(confusion, classes, positive_class), "val_patients": self.patients}
        del out["n"]  # the noisy count of a confusion matrix; val_patients is the one reported
        if self.layout.binary:
            positive = self.layout.positive_index  # the class whose score the histograms hold
            out["auc"] = binned_auc(histograms[positive, 0], histograms[1 - positive, 0])
        else:
            out["auc"] = nanmean([binned_auc(histograms[k, k], histograms[:, k].sum(axis=0) - histograms[k, k])
                                   for k in range(len(classes))])
        return out


def binned_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """ROC AUC from score histograms: P(positive's bin > negative's bin) + half P(same bin)."""
    positives, negatives = np.asarray(positives, float), np.asarray(negatives, float)
    total = positives.sum() * negatives.sum()
    if total <= 0:
        return math.nan
    below = np.concatenate([[0.0], np.cumsum(negatives)[:-1]])
    return float((positives * (below + 0.5 * negatives)).sum() / total)


@dataclass(frozen=True)
class RoundSums:
    """What the server reads from one round: the sums over the sites that answered."""

    update: list[np.ndarray] | None  # the patient-weighted mean update; None when no patient trained
    patients: float  # training patients over all sites
    evaluation: EvaluationCounts


def encode_reply(update: Sequence[np.ndarray], patients: int, counts: np.ndarray, scale: float,
                 stats_range: float | None = None) -> list[np.ndarray]:
    """A site's reply: one vector (``shared/parameters.pack``) of ``patients · update / scale`` per
    tensor, then [patients, counts...] / scale, those clipped to ±``stats_range`` when given (SecAgg+'s
    clipping range: noisy counts may stray past it; they are clipped here, never by the mod)."""
    arrays = [np.asarray(u, dtype=np.float32) * np.float32(patients / scale) for u in update]
    stats = np.concatenate([[patients], np.asarray(counts, dtype=np.float64)]) / scale
    if stats_range is not None:
        stats = np.clip(stats, -stats_range, stats_range)
    return pack([*arrays, stats.astype(np.float32)])


def decode_sum(total: Sequence[np.ndarray], layout: CountLayout, scale: float,
               shapes: Sequence[tuple[int, ...]]) -> RoundSums:
    """The reply vectors summed over sites (``total``) read back for a model of ``shapes``: mean
    update, patients, counts."""
    try:
        *weighted, stats = unpack(total, [*shapes, stats_shape(layout)], "a reply")
    except ParameterMismatch as exc:
        raise ParameterMismatch(f"{exc} (statistics {stats_shape(layout)[0]} of them: sites and server may also "
                                "disagree on classes or evaluation bins)") from None
    weighted, stats = [np.asarray(w, dtype=np.float64) for w in weighted], np.asarray(stats, dtype=np.float64)
    patients = float(stats[0] * scale)
    counts = EvaluationCounts.from_vector(layout, stats[1:] * scale)
    # Under 0.5 patient the sum is quantisation noise: nobody trained.
    update = None if patients < 0.5 else [(w * scale / patients).astype(np.float32) for w in weighted]
    return RoundSums(update, patients, counts)


def stats_shape(layout: CountLayout) -> tuple[int]:
    """Shape of the statistics array that ends every reply."""
    return (1 + layout.size,)


def _binary_confusion(layout: CountLayout, histograms: np.ndarray) -> np.ndarray:
    """Binary confusion counts from the positive-class score histograms: predicted positive <=> the score
    is in the upper half of the bins (above 0.5, where the arg-max switches)."""
    confusion = np.zeros((2, 2))
    positive, negative = layout.positive_index, 1 - layout.positive_index
    confusion[:, positive] = histograms[:, 0, layout.bins // 2:].sum(axis=1)
    confusion[:, negative] = histograms[:, 0, :layout.bins // 2].sum(axis=1)
    return confusion


def _bin(score: float, bins: int) -> int:
    return min(int(score * bins), bins - 1)
