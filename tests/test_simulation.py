"""`fedpath-sim`: config validation, split preview, materialised sites, and a real simulated federation.

The hospitals of the ``prepared_hospitals`` fixture are the data source (a manifest of their
slides); their cached vectors seed the simulation's feature store, so only stain-shifted tiles
go through the encoder here.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from client.feature_cache import FeatureCache
from client.site_config import load_site_config
from shared.yaml_config import ConfigError
from simulations.sim_config import load_sim_config, parse_sim_config
from tests.conftest import FAST_TILING, FEDERATION_CLASSES


def write_sim(folder: Path, prepared: Path, **simulation) -> Path:
    """sim.yaml over the prepared hospitals' slides, with their vectors copied into its feature store."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "slides.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("slide", "label", "patient"))
        for manifest in sorted(prepared.glob("site-*/manifest.csv")):
            for row in csv.DictReader(manifest.open()):
                writer.writerow((manifest.parent / row["slide"], row["label"], row["patient"]))
    store = folder / "cache" / "features"
    store.mkdir(parents=True, exist_ok=True)
    for entry in prepared.glob("site-*/cache/features/*.npz"):
        shutil.copyfile(entry, store / entry.name)
    document = {
        "classes": FEDERATION_CLASSES, "positive_class": "adenocarcinoma",
        "federation": {"rounds": 2, "min_sites": min(2, simulation.get("sites", 3)), "round_timeout": 300},
        "training": {"epochs": 1, "batch_size": 2, "learning_rate": 0.003},
        "simulation": {"sites": 3, "seed": 4, "data": {"source": "manifest", "manifest": "slides.csv"},
                       "test_fraction": 0.2, "val_fraction": 0.25, "tiling": dict(FAST_TILING),
                       "features": {"batch_size": 16, "num_workers": 0}, **simulation},
    }
    path = folder / "sim.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="min_sites"):
        parse_sim_config({"classes": FEDERATION_CLASSES, "simulation": {"sites": 1}})
    with pytest.raises(ConfigError, match="privacy.required"):
        parse_sim_config({"classes": FEDERATION_CLASSES, "simulation": {"site_privacy": {"enabled": False}}})
    with pytest.raises(ConfigError, match="class_map"):
        parse_sim_config({"classes": FEDERATION_CLASSES, "simulation": {"data": {
            "class_map": [{"name": "adenoma", "labels": ["T"]}, {"name": "carcinoma", "labels": ["AC"]}]}}})
    with pytest.raises(ConfigError, match="scheme"):
        parse_sim_config({"classes": FEDERATION_CLASSES, "simulation": {"partition": {"scheme": "random"}}})
    with pytest.raises(ConfigError, match="model.trainable: last_block is not simulated yet"):
        parse_sim_config({"classes": FEDERATION_CLASSES, "model": {"trainable": "last_block"}})
    config = parse_sim_config({"classes": FEDERATION_CLASSES})
    assert config.secure_aggregation.enabled is False  # simulation default
    assert config.server_config(Path("runs")).classes == tuple(FEDERATION_CLASSES)


def test_split_preview_writes_table_and_chart(prepared_hospitals, tmp_path):
    from simulations.split_preview import preview_split

    config = load_sim_config(write_sim(tmp_path, prepared_hospitals, partition={"scheme": "dirichlet", "alpha": 0.5}))
    table, chart = preview_split(config, tmp_path / "out")
    assert chart.is_file() and chart.stat().st_size > 1000 and (tmp_path / "out" / "split.txt").is_file()
    assert all(name in table for name in ("site-001", "site-002", "site-003", "test"))
    rows = json.loads((tmp_path / "out" / "split.json").read_text())["sites"]
    assert sum(r["items"] for r in rows) == 15  # every slide once: 3 hospitals x 5
    assert rows[-1]["site"] == "test" and rows[-1]["test"] == rows[-1]["items"] > 0
    again, _ = preview_split(config, tmp_path / "again")
    assert again == table  # same seed, same split
    assert not list((tmp_path / "out").glob("sites"))  # a preview materialises nothing


def test_stain_shift_reaches_the_site_cache(prepared_hospitals, tmp_path):
    """Shifted sites get vectors of their own stain; the unshifted test set reuses the stored ones."""
    from simulations.materialise import materialise

    config = load_sim_config(write_sim(tmp_path, prepared_hospitals, sites=1, stain_shift={"strength": 1.0},
                                       data={"source": "manifest", "manifest": "slides.csv", "items_per_class": 2}))
    layout = materialise(config, tmp_path / "out", progress=False)
    site = FeatureCache(load_site_config(layout.site_configs[0]).features.cache_dir).read_index()
    assert site.settings["stain_shift"]["h_scale"] != 1.0
    stored = {e.stem for e in prepared_hospitals.glob("site-*/cache/features/*.npz")}
    assert not {record["key"] for record in site.items.values()} & stored  # recomputed under the shift
    test = FeatureCache(load_site_config(layout.test_config).features.cache_dir).read_index()
    assert {record["key"] for record in test.items.values()} <= stored  # reused as they were
    pooled = FeatureCache(load_site_config(layout.pooled_config).features.cache_dir).read_index()
    assert set(pooled.items) == set(site.items)
    assert {r["split"] for r in site.items.values()} <= {"train", "val"}
    assert {r["split"] for r in test.items.values()} == {"test"}


@pytest.mark.slow(seconds=75)
def test_three_sites_two_rounds_on_the_simulation_engine(prepared_hospitals, tmp_path):
    from simulations.cli import main

    sim_yaml = write_sim(tmp_path, prepared_hospitals, reproducible_noise=True)
    out = tmp_path / "sim"
    assert main(["run", "--config", str(sim_yaml), "--out", str(out)]) == 0

    run = next((out / "runs").iterdir())
    for name in ("metrics.json", "metrics.csv", "curves.png", "audit.jsonl", "status.json", "server.yaml",
                 "checkpoints/latest.npz", "checkpoints/latest.json", "test_metrics.json"):
        assert (run / name).is_file(), name
    rounds = json.loads((run / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2]  # the initial model, then every round
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and len(status["sites"]) == 3
    assert all(0 < site["epsilon"] <= 8.0 for site in status["sites"].values())  # DP ran under the ledger
    names = json.loads((run / "site_names.json").read_text())  # node-<id> -> site-00k
    assert set(names) == set(status["sites"]) and sorted(names.values()) == ["site-001", "site-002", "site-003"]
    for site_yaml in sorted((out / "sites").glob("site-*/site.yaml")):
        assert list((site_yaml.parent / "state" / "ledgers").glob(f"{run.name}.json"))
    card = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert card["reproducible_noise"] is True  # the run config carried it to the ServerApp (and the sites)
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["test_items"] >= 2 and 0.0 <= test["accuracy"] <= 1.0 and "auc" in test
    assert not _processes_mentioning(out)  # the SuperLink and everything under it are gone


def _processes_mentioning(path: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(path).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_partition_keeps_patients_within_one_site_and_split(prepared_hospitals, tmp_path):
    from simulations.site_split import pool_items, split_sites

    config = load_sim_config(write_sim(tmp_path, prepared_hospitals))
    split = split_sites(config, *pool_items(config, tmp_path / "cache"))
    where: dict[str, tuple[str, str]] = {}
    groups = [(f"site-{i}", it) for i, site in enumerate(split.sites) for it in site] + \
        [("test", it) for it in split.test]
    for group, item in groups:
        assert where.setdefault(item.patient, (group, item.split)) == (group, item.split)
    assert len(groups) == len({item.item_id for _, item in groups}) == 15
    assert np.all([any(it.split == "train" for it in site) for site in split.sites])
