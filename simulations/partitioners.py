"""Deal items to virtual hospitals: IID, label skew (Dirichlet α), quantity skew (Dirichlet β).

Pure functions of (labels, patients, number of sites, generator) that return the site index of
every item. They deal patients, never items, so a patient's slides always land at one site, and
they visit patients in sorted order, so the same seed gives the same split whatever order the
items came in. Every item gets exactly one site; a split that would leave a site empty is drawn
again (a bounded number of times), then refused with an error that says what to change.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Callable, Sequence

import numpy as np

from shared.errors import UserError

MAX_DRAWS = 100
"""Draws of a skewed split before giving up on giving every site a patient."""


class PartitionError(UserError, ValueError):
    pass


def patient_labels(labels: Sequence[str], patients: Sequence[str]) -> dict[str, str]:
    """Each patient's label: the most frequent among their items (ties: the first in sorted order)."""
    by_patient: dict[str, Counter] = defaultdict(Counter)
    for label, patient in zip(labels, patients, strict=True):
        by_patient[patient][label] += 1
    return {p: sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for p, counts in by_patient.items()}


def iid(labels: Sequence[str], patients: Sequence[str], sites: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffled patients of each class dealt round robin: every site gets the same class mix."""
    def deal(by_label: dict[str, list[str]]) -> dict[str, int]:
        out, turn = {}, 0
        for label in sorted(by_label):
            for patient in rng.permutation(by_label[label]):
                out[str(patient)] = turn % sites
                turn += 1
        return out

    return _items(patients, _checked(deal(_by_label(labels, patients)), sites, "iid"))


def dirichlet(labels: Sequence[str], patients: Sequence[str], sites: int, rng: np.random.Generator,
              alpha: float) -> np.ndarray:
    """Label skew: each class's patients are shared among the sites by proportions ~ Dirichlet(α).

    Large α gives every site about the same class mix (IID); small α gives each site mostly
    one class. Draws leaving a site without patients are redrawn.
    """
    if alpha <= 0:
        raise PartitionError(f"dirichlet alpha must be > 0, got {alpha}")
    by_label = _by_label(labels, patients)

    def draw() -> dict[str, int]:
        out = {}
        for label in sorted(by_label):
            shuffled = [str(p) for p in rng.permutation(by_label[label])]
            out.update(_cut(shuffled, rng.dirichlet(np.full(sites, alpha))))
        return out

    return _items(patients, _redraw(draw, sites, f"dirichlet α={alpha:g}"))


def quantity(labels: Sequence[str], patients: Sequence[str], sites: int, rng: np.random.Generator,
             beta: float) -> np.ndarray:
    """Quantity skew: site sizes ~ Dirichlet(β) shares of all patients, class mix as in the pool."""
    if beta <= 0:
        raise PartitionError(f"quantity beta must be > 0, got {beta}")
    everyone = sorted(set(patients))

    def draw() -> dict[str, int]:
        return _cut([str(p) for p in rng.permutation(everyone)], rng.dirichlet(np.full(sites, beta)))

    return _items(patients, _redraw(draw, sites, f"quantity β={beta:g}"))


def partition(scheme: str, labels: Sequence[str], patients: Sequence[str], sites: int, seed: int,
              alpha: float = 0.5, beta: float = 1.0) -> np.ndarray:
    """The site index of every item under ``scheme`` (iid | dirichlet | quantity), for ``seed``."""
    if sites < 1:
        raise PartitionError(f"need at least one site, got {sites}")
    rng = np.random.default_rng([seed, 0x5EED])
    if scheme == "iid":
        return iid(labels, patients, sites, rng)
    if scheme == "dirichlet":
        return dirichlet(labels, patients, sites, rng, alpha)
    if scheme == "quantity":
        return quantity(labels, patients, sites, rng, beta)
    raise PartitionError(f"unknown partition scheme '{scheme}' (iid, dirichlet, quantity)")


def _by_label(labels: Sequence[str], patients: Sequence[str]) -> dict[str, list[str]]:
    by_label: dict[str, list[str]] = defaultdict(list)
    for patient, label in sorted(patient_labels(labels, patients).items()):
        by_label[label].append(patient)
    return by_label


def _cut(patients: list[str], shares: np.ndarray) -> dict[str, int]:
    """Consecutive runs of ``patients`` sized by ``shares`` (rounded at cumulative boundaries)."""
    bounds = np.round(np.cumsum(shares) * len(patients)).astype(int)
    bounds[-1] = len(patients)
    site_of = np.searchsorted(bounds, np.arange(len(patients)), side="right")
    return {patient: int(site) for patient, site in zip(patients, site_of, strict=True)}


def _redraw(draw: Callable[[], dict[str, int]], sites: int, what: str) -> dict[str, int]:
    for _ in range(MAX_DRAWS):
        assignment = draw()
        if len(set(assignment.values())) == sites:
            return assignment
    return _checked(assignment, sites, what, draws=MAX_DRAWS)


def _checked(assignment: dict[str, int], sites: int, what: str, draws: int = 1) -> dict[str, int]:
    empty = sorted(set(range(sites)) - set(assignment.values()))
    if empty:
        tried = f" in {draws} draws" if draws > 1 else ""
        raise PartitionError(
            f"{what}: {len(assignment)} patients cannot give each of {sites} sites at least one{tried} "
            f"(site(s) {', '.join(str(i + 1) for i in empty[:5])} stay empty): use fewer sites, more data, "
            "or a larger alpha/beta")
    return assignment


def _items(patients: Sequence[str], assignment: dict[str, int]) -> np.ndarray:
    return np.array([assignment[p] for p in patients], dtype=np.int64)
