"""Turn a SimConfig into virtual hospitals on disk: a site.yaml, a feature cache and a state folder each.

    OUT/sites/site-001/site.yaml   what a hospital's IT would write for these items
    OUT/sites/site-001/cache/      index.json (this site's items, train/val) + features -> the store
    OUT/sites/site-001/state/      the site's privacy ledgers (written by the ClientApp)
    OUT/pooled/                    every site's train + val items in one cache (centralised baseline)
    OUT/test/                      the held-out test patients, unshifted
    OUT/split.json                 the split: class counts, patients, train/val per site

Tile vectors live once in the shared feature store (``simulation.features.cache_dir``) and the
site caches link to it, so an item's vectors are computed once per (item, site stain) and every
later run, seed or experiment of the same settings reuses them. The ClientApp of virtual
hospital ``i`` finds ``OUT/sites/<site_name(i)>/site.yaml`` (``client/app.py``).
"""

from __future__ import annotations

import csv
import functools
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from client.feature_cache import CacheIndex, FeatureCache
from client.features import load_encoder
from client.prepare import feature_settings, prepare_site
from client.site_config import load_site_config
from client.sources import Item
from shared.atomic_files import atomic_write_json
from shared.errors import UserError
from simulations.sim_config import SimConfig
from simulations.site_split import pool_items, site_name, split_sites
from simulations.stain_shift import site_shift


@dataclass(frozen=True)
class SimLayout:
    root: Path
    site_configs: tuple[Path, ...]  # site.yaml per virtual hospital; feature caches ready (its train+val items)
    pooled_config: Path  # one site.yaml with every site's train + val items (centralised baseline)
    test_config: Path  # site.yaml whose cache holds the held-out test items (all evaluations)
    classes: tuple[str, ...]

    @property
    def sites_dir(self) -> Path:
        return self.root / "sites"


def feature_store(config: SimConfig, out: Path) -> Path:
    return Path(config.simulation.features.cache_dir or Path(out) / "cache")


def materialise(config: SimConfig, out: Path, progress: bool = True) -> SimLayout:
    """Write every virtual hospital and prepare its feature cache; idempotent (reuses cached vectors)."""
    out = Path(out).resolve()
    store = feature_store(config, out)
    items, unused = pool_items(config, store, progress)
    split = split_sites(config, items, unused)
    sites = []
    encoder = functools.cache(load_encoder)  # built once, and only if some item needs its vectors
    for index, site_items in enumerate(split.sites):
        name = site_name(index)
        path = _write_site(config, out / "sites" / name, name, site_items, store)
        shift = site_shift(config.simulation.seed, index + 1, config.simulation.stain_shift.strength)
        _prepare(path, site_items, shift, encoder, progress)
        sites.append(path)
    test = _write_site(config, out / "test", "test", split.test, store)
    _prepare(test, split.test, None, encoder, progress)
    pooled = _write_site(config, out / "pooled", "pooled", [it for s in split.sites for it in s], store)
    _pool_indexes(config, pooled, sites)
    atomic_write_json(out / "split.json", split.record(config))
    return SimLayout(out, tuple(sites), pooled, test, tuple(config.classes))


def _write_site(config: SimConfig, folder: Path, name: str, items: list[Item] | tuple[Item, ...], store: Path) -> Path:
    """site.yaml (and its manifest or tile folder) for ``items``; the cache links to the store."""
    sim = config.simulation
    folder.mkdir(parents=True, exist_ok=True)
    if sim.data.source == "tiles":
        data = {"tile_folder": "tiles", "group_size": sim.data.group_size}
        _link_tiles(folder / "tiles", items)
    else:
        data = {"manifest": "manifest.csv", "mpp_override": sim.data.mpp_override}
        _write_manifest(folder / "manifest.csv", items)
    privacy = {"enabled": sim.site_privacy.enabled, "epsilon": config.privacy.epsilon, "delta": config.privacy.delta,
               "accountant": sim.site_privacy.accountant, "max_grad_norm": sim.site_privacy.max_grad_norm,
               "planned_rounds": config.federation.rounds, "release_evaluation": sim.site_privacy.release_evaluation}
    features = {**asdict(sim.features), "cache_dir": "cache"}
    document = {"name": name, "data": {**data, "labels": list(config.classes), "val_fraction": sim.val_fraction,
                                       "split_seed": sim.seed},
                "tiling": asdict(sim.tiling), "features": features, "model": asdict(config.model),
                "privacy": privacy,
                # the researcher plays every hospital: its sites accept the simulation's own settings
                "federation": {"require_secure_aggregation": config.secure_aggregation.enabled,
                               "min_round_sites": 2}}
    path = folder / "site.yaml"
    path.write_text("# written by fedpath-sim: one virtual hospital of a simulation\n"
                    + yaml.safe_dump(document, sort_keys=False))
    (store / "features").mkdir(parents=True, exist_ok=True)
    _link(folder / "cache" / "features", store / "features")
    return path


def _prepare(site_yaml: Path, items, transform, encoder, progress: bool) -> None:
    summary = prepare_site(load_site_config(site_yaml), progress=progress, items=list(items), tile_transform=transform,
                           encoder_loader=encoder)
    skipped = [o for o in summary.outcomes if o.status == "skipped"]
    if skipped:
        print(f"{site_yaml.parent.name}: {len(skipped)} item(s) skipped: "
              + "; ".join(f"{o.item.item_id}: {o.reason}" for o in skipped[:5]), flush=True)


def _pool_indexes(config: SimConfig, pooled_yaml: Path, site_yamls: list[Path]) -> None:
    """The pooled cache is the union of the site caches: each item's vectors as its own site made them."""
    pooled = load_site_config(pooled_yaml)
    indexes = [FeatureCache(load_site_config(p).features.cache_dir).read_index() for p in site_yamls]
    settings = feature_settings(pooled)
    if config.simulation.stain_shift.strength > 0:
        settings = {**settings, "stain_shift": "each item as stained at its site"}
    items = {item_id: record for index in indexes for item_id, record in index.items.items()}
    FeatureCache(pooled.features.cache_dir).write_index(
        CacheIndex(indexes[0].backbone, settings, list(config.classes), items))


def _write_manifest(path: Path, items) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("slide", "label", "patient", "split"))
        for it in items:
            writer.writerow((str(it.files[0]), it.label, it.patient, it.split))


def _link_tiles(folder: Path, items) -> None:
    """The site's tiles as links, one folder per class (the handout data is never copied); links of
    an earlier split in the same folder are removed first."""
    if folder.is_dir():
        shutil.rmtree(folder)  # links only: their targets are untouched
    for it in items:
        for tile in it.files:
            _link(folder / it.label / f"{tile.parent.name}-{tile.name}", tile)


def _link(link: Path, target: Path) -> None:
    target = Path(target).resolve()
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        if link.is_dir() and not link.is_symlink():
            raise UserError(f"{link} is a folder, expected a link to {target}; remove it and run again")
        link.unlink()
    link.symlink_to(target)

