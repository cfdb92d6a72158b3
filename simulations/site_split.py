"""Which items each virtual hospital holds: the pool of items, the held-out test patients, the split.

The pool comes from the data source of ``sim.yaml`` (generated slides, a tile folder, a slide
manifest), relabelled into the model's classes. Test patients are held out first (stratified by
class), the rest are dealt to the sites by the configured partitioner, and each site splits its
own patients into train and validation, all by patient and all from the one seed. Nothing here
reads pixels: `fedpath-sim split` previews this, `materialise` then computes features for it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from client.app import simulated_site_name
from client.sources import Item, SourceError, assign_splits, read_manifest, read_tile_folder
from simulations.partitioners import PartitionError, partition
from simulations.sim_config import SimConfig


@dataclass(frozen=True)
class SiteSplit:
    sites: tuple[tuple[Item, ...], ...]  # per virtual hospital, split train/val
    test: tuple[Item, ...]  # held-out patients, split "test"
    unused: int = 0  # source items of no configured class (e.g. crc-tiles' H and S)

    def record(self, config: SimConfig) -> dict:
        """What split.json holds: the classes, the partition and the per-site summary."""
        return {"classes": list(config.classes), "unused_items": self.unused,
                "partition": asdict(config.simulation.partition), "sites": self.summary(config.classes)}

    def summary(self, classes: tuple[str, ...]) -> list[dict]:
        """Per site (then the test set): class counts, patients, train/val items."""
        rows = []
        for name, items in [*((site_name(i), s) for i, s in enumerate(self.sites)), ("test", self.test)]:
            labels = Counter(it.label for it in items)
            splits = Counter(it.split for it in items)
            rows.append({"site": name, **{c: labels.get(c, 0) for c in classes},
                         "items": len(items), "patients": len({it.patient for it in items}),
                         "train": splits.get("train", 0), "val": splits.get("val", 0),
                         "test": splits.get("test", 0)})
        return rows


def site_name(index: int) -> str:
    """Virtual hospital ``index`` (0-based, Flower's partition id): the name its ClientApp looks for."""
    return simulated_site_name(index)


def generated_pool_dir(config: SimConfig, store: Path) -> Path:
    """Where the generated slides of these settings live: made once, reused by every run."""
    generated = config.simulation.data.generated
    tag = json.dumps({"seed": config.simulation.seed, "slides": generated.slides, "size": generated.size,
                      "cancer_fraction": generated.cancer_fraction}, sort_keys=True)
    return Path(store) / "generated" / hashlib.sha256(tag.encode()).hexdigest()[:16]


def pool_items(config: SimConfig, store: Path, progress: bool = False) -> tuple[list[Item], int]:
    """Every usable item of the source, labelled with model classes; and how many were left out."""
    data, seed = config.simulation.data, config.simulation.seed
    mapping = {label: name for name, labels in config.source_labels().items() for label in labels}
    if data.source == "generated":
        manifest = _generated_manifest(config, store, progress)
        items, problems = read_manifest(manifest, (), 0.0, seed)
    elif data.source == "manifest":
        items, problems = read_manifest(data.manifest, (), 0.0, seed)
    else:
        folders = tuple(mapping)
        items, problems = read_tile_folder(data.tile_folder, folders, data.group_size, 0.0, seed)
    fatal = [f"{p.where}: {p.message}" for p in problems if p.fatal]
    if fatal:
        raise SourceError("the simulation's data source has problems:\n  " + "\n  ".join(fatal[:20]))
    usable = [replace(it, label=mapping[it.label], split="") for it in items if it.label in mapping]
    if data.items_per_class is not None:
        usable = _capped(usable, data.items_per_class, seed)
    missing = [c for c in config.classes if not any(it.label == c for it in usable)]
    if missing:
        raise SourceError(f"the data source has no item of class(es) {missing} (check simulation.data.class_map)")
    return usable, len(items) - len(usable)


def split_sites(config: SimConfig, items: list[Item], unused: int = 0) -> SiteSplit:
    """Hold out test patients, deal the rest to the sites, split each site into train/val."""
    sim = config.simulation
    held = assign_splits(items, sim.test_fraction, sim.seed)
    test = tuple(replace(it, split="test") for it in held if it.split == "val")
    pool = [replace(it, split="") for it in held if it.split == "train"]
    if not test:
        raise PartitionError(f"simulation.test_fraction {sim.test_fraction} holds out no patient; raise it")
    index = partition(sim.partition.scheme, [it.label for it in pool], [it.patient for it in pool], sim.sites,
                      sim.seed, alpha=sim.partition.alpha, beta=sim.partition.beta)
    sites = []
    for site in range(sim.sites):
        own = [it for it, where in zip(pool, index, strict=True) if where == site]
        split = tuple(assign_splits(own, sim.val_fraction, sim.seed + site))
        if not any(it.split == "train" for it in split):
            raise PartitionError(f"{site_name(site)} would hold no training item ({len(split)} item(s), all in "
                                 "validation): lower simulation.val_fraction, use fewer sites or a larger alpha")
        sites.append(split)
    return SiteSplit(tuple(sites), test, unused)


def _generated_manifest(config: SimConfig, store: Path, progress: bool) -> Path:
    from simulations.slide_generator import SlideSpec, make_site_slides

    folder = generated_pool_dir(config, store)
    manifest = folder / "site-1" / "manifest.csv"
    if not manifest.is_file():  # the generator writes the manifest last: its presence marks a complete pool
        generated = config.simulation.data.generated
        fraction = generated.cancer_fraction
        make_site_slides(folder, 1, generated.slides, config.simulation.seed,
                         SlideSpec(width=generated.size, height=generated.size), progress=progress,
                         cancer_fraction_range=(fraction, fraction))
    return manifest


def _capped(items: list[Item], per_class: int, seed: int) -> list[Item]:
    """At most ``per_class`` items of each class, whole patients, chosen by a seeded order."""
    rng = np.random.default_rng([seed, 0xCA9])
    sizes = Counter(it.patient for it in items)
    keep: set[str] = set()
    for label in sorted({it.label for it in items}):
        patients = sorted({it.patient for it in items if it.label == label})
        taken = 0
        for patient in rng.permutation(patients):
            if taken >= per_class:
                break
            keep.add(str(patient))
            taken += sizes[str(patient)]
    return [it for it in items if it.patient in keep]
