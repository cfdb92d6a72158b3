"""Partitioners: proportions, determinism, patient grouping, nothing lost or duplicated."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from simulations.partitioners import PartitionError, partition


def pool(patients_per_class: int = 200, classes: tuple[str, ...] = ("a", "b"), slides_per_patient: int = 2):
    labels, patients = [], []
    for label in classes:
        for p in range(patients_per_class):
            for _ in range(slides_per_patient):
                labels.append(label)
                patients.append(f"{label}-{p}")
    return labels, patients


def class_share(labels, sites, site: int, label: str) -> float:
    mine = [lab for lab, s in zip(labels, sites, strict=True) if s == site]
    return mine.count(label) / len(mine)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_every_item_gets_one_site_and_patients_stay_together(scheme):
    labels, patients = pool()
    sites = partition(scheme, labels, patients, 5, seed=3, alpha=0.5, beta=1.0)
    assert sites.shape == (len(labels),)
    assert set(sites) == set(range(5))  # every item once (an array), every site used
    where = {}
    for patient, site in zip(patients, sites, strict=True):
        assert where.setdefault(patient, site) == site


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_same_seed_same_split_whatever_the_item_order(scheme):
    labels, patients = pool(50)
    first = partition(scheme, labels, patients, 4, seed=9)
    assert np.array_equal(first, partition(scheme, labels, patients, 4, seed=9))
    order = np.random.default_rng(0).permutation(len(labels))
    shuffled = partition(scheme, [labels[i] for i in order], [patients[i] for i in order], 4, seed=9)
    assert np.array_equal(shuffled, first[order])
    assert not np.array_equal(first, partition(scheme, labels, patients, 4, seed=10))


def test_iid_gives_every_site_the_pool_mix_and_equal_sizes():
    labels, patients = pool(100, classes=("a", "b", "c"))
    sites = partition("iid", labels, patients, 5, seed=1)
    sizes = Counter(sites.tolist())
    assert max(sizes.values()) - min(sizes.values()) <= 2 * 2  # at most one patient (2 slides) apart per class
    for site in range(5):
        assert class_share(labels, sites, site, "a") == pytest.approx(1 / 3, abs=0.02)


def test_dirichlet_large_alpha_is_about_iid_and_small_alpha_is_skewed():
    labels, patients = pool(400)
    flat = partition("dirichlet", labels, patients, 4, seed=2, alpha=1000.0)
    for site in range(4):
        assert class_share(labels, flat, site, "a") == pytest.approx(0.5, abs=0.05)
    skewed = partition("dirichlet", labels, patients, 4, seed=2, alpha=0.1)
    shares = [class_share(labels, skewed, site, "a") for site in range(4)]
    assert max(abs(s - 0.5) for s in shares) > 0.3  # some site sees mostly one class


def test_quantity_skew_makes_unequal_sites_with_the_pool_mix():
    labels, patients = pool(400)
    even = Counter(partition("quantity", labels, patients, 4, seed=5, beta=1000.0).tolist())
    assert max(even.values()) / min(even.values()) < 1.2
    sites = partition("quantity", labels, patients, 4, seed=5, beta=0.5)
    sizes = Counter(sites.tolist())
    assert max(sizes.values()) / min(sizes.values()) > 2
    largest = max(sizes, key=sizes.get)
    assert class_share(labels, sites, largest, "a") == pytest.approx(0.5, abs=0.1)


def test_a_site_that_would_stay_empty_is_a_clear_error():
    labels, patients = pool(2)  # 4 patients
    with pytest.raises(PartitionError, match="5 sites"):
        partition("iid", labels, patients, 5, seed=0)
    with pytest.raises(PartitionError, match="dirichlet"):
        partition("dirichlet", labels, patients, 4, seed=0, alpha=0.01)
    with pytest.raises(PartitionError, match="unknown partition scheme"):
        partition("by-hospital", labels, patients, 2, seed=0)
