"""Is federated training worth it? FedAvg against all data pooled and each hospital alone, with and without DP.

Real colorectal tiles, adenocarcinoma (AC) against adenoma (T + V), on the consortium's trunk:
InceptionV3 pretrained on one part of ``../shared/data/crc-tiles`` (all five classes) before any
round, as a consortium would on public data, and pinned (``model.trunk_sha256``). The simulation
sees only the disjoint evaluation part (``benchmarks/_crc_trunk.py``, shared with
``encoder_transfer``), at the pretraining's tile size: 240 tiles of AC and 240 of T + V, one
tile per item (the privacy unit; the data has no patient ids), 5 virtual hospitals with
Dirichlet(α = 0.5) label skew, 20 % of the items held out as the one test set of every model.
Run as an experiment (``simulations/experiment.py``): FedAvg on Flower's Simulation Engine
without DP and with DP at ε = 8, beside the centralised and local-only baselines trained with
the same head (RNN over each tile's InceptionV3 map, ``model.mode: grid``), the same optimiser
and the same budget of epochs (rounds x local epochs).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from benchmarks._crc_trunk import CRC_TILES, EVAL_CLASSES, FULL, QUICK, WORK, CrcTrunk, pretrained_trunk
from simulations.experiment import run_experiment
from simulations.experiment_config import Baselines, ExperimentConfig, GridAxes, check_cells
from simulations.sim_config import parse_sim_config

GROUP_SIZE = 1  # tiles per item: at 96 px a tile is a 1 x 1 map, cheap enough to extract one at a time
STORE = WORK / "crc-tiles-features"
"""The feature store, kept between runs (and shared with ``membership_inference``): tile vectors are
not what these benchmarks measure. Delete it to recompute them."""
GOALS = {"fedavg_minus_central": -0.02, "fedavg_dp_minus_central": -0.05}  # points, as fractions


def crc_simulation(trunk: CrcTrunk, store: Path, sites: int, rounds: int, epochs: int, items_per_class: int | None,
                   partition: dict, training: dict | None = None, group_size: int = 1) -> dict:
    """The sim.yaml settings of a simulation on the evaluation part of crc-tiles (AC against T + V)
    with the pretrained trunk pinned, as a mapping."""
    return {"name": "crc-tiles AC vs T+V", "classes": ["adenoma", "adenocarcinoma"],
            "positive_class": "adenocarcinoma",
            "federation": {"rounds": rounds, "min_sites": sites, "round_timeout": 600},
            "model": {"core": "rnn", "mode": "grid", "trunk_sha256": trunk.sha256},
            "training": {"epochs": epochs, "batch_size": 16, "learning_rate": 1e-3, **(training or {})},
            "privacy": {"epsilon": 8.0},
            "simulation": {"sites": sites, "seed": 0, "test_fraction": 0.2, "val_fraction": 0.2,
                           "data": {"source": "tiles", "tile_folder": str(trunk.eval_dir),
                                    "group_size": group_size, "items_per_class": items_per_class},
                           "partition": partition, "tiling": {"tile_size": trunk.plan.settings.tile_size},
                           "features": {"backbone_weights": str(trunk.weights), "cache_dir": str(store),
                                        "batch_size": 32, "num_workers": 1}}}


def goals_met(gaps: dict) -> dict:
    """Each goal judged on accuracy and on AUC: accuracy at the arg-max depends on where the
    outputs sit (DP-SGD's noise shifts them), the ranking (AUC) does not."""
    return {name: {"limit": limit, **{metric: gaps[f"{name}_{metric}"] >= limit for metric in ("accuracy", "auc")}}
            for name, limit in GOALS.items()}


def _metrics(row: dict) -> dict:
    keep = ("accuracy", "auc", "sensitivity", "specificity", "epsilon")
    return {key: None if row.get(key) is None else round(row[key], 4) for key in keep}


def run(quick: bool) -> dict:
    if not CRC_TILES.is_dir():
        return {"skipped": f"data folder absent: {CRC_TILES}"}
    logging.getLogger("fedpath.site").setLevel(logging.ERROR)
    trunk = pretrained_trunk(QUICK if quick else FULL)
    # Every AC tile of the evaluation part, and as many of T + V.
    sites, rounds, epochs, per_class = (5, 2, 1, 20) if quick else (5, 10, 2, trunk.plan.eval_per_class)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        document = crc_simulation(trunk, STORE, sites, rounds, epochs, per_class,
                                  {"scheme": "dirichlet", "alpha": 0.5}, group_size=GROUP_SIZE)
        config = ExperimentConfig(name="fed_vs_central", base=parse_sim_config(document, "fed_vs_central"),
                                  grid=GridAxes(strategy=("fedavg",), dp=(False, True), epsilon=(8.0,)),
                                  baselines=Baselines(centralised=True, local=True), out_dir=root / "experiment")
        run_experiment(check_cells(config, "fed_vs_central"), progress=False)
        rows = {row["cell"].rsplit("_sites", 1)[0]: row
                for row in json.loads((root / "experiment" / "results.json").read_text())}
        split = json.loads(next((root / "experiment" / "data").glob("*nodp*/split.json")).read_text())
    settings = {"centralised": rows["centralised_nodp_alpha0.5"], "fedavg": rows["fedavg_nodp_alpha0.5"],
                "local_only_mean": rows["local_nodp_alpha0.5"], "centralised_dp": rows["centralised_dp-eps8_alpha0.5"],
                "fedavg_dp": rows["fedavg_dp-eps8_alpha0.5"], "local_only_dp_mean": rows["local_dp-eps8_alpha0.5"]}
    results = {name: _metrics(row) for name, row in settings.items()}
    for name in ("local_only_mean", "local_only_dp_mean"):
        results[name]["per_site"] = {site: _metrics(m) for site, m in settings[name]["per_site"].items()}
    for name in ("fedavg", "fedavg_dp"):
        results[name]["curve"] = [{k: round(v, 4) if isinstance(v, float) else v for k, v in point.items()
                                   if k in ("round", "accuracy", "auc")} for point in settings[name]["curve"]]
    gaps = {}
    for name, against in (("fedavg_minus_central", "fedavg"), ("fedavg_dp_minus_central", "fedavg_dp")):
        for metric in ("accuracy", "auc"):
            gaps[f"{name}_{metric}"] = round(results[against][metric] - results["centralised"][metric], 4)
    goals = goals_met(gaps)
    return {"tile_size": trunk.plan.settings.tile_size, "group_size": GROUP_SIZE, "sites": sites, "alpha": 0.5,
            "rounds": rounds, "local_epochs": epochs, "epoch_budget": rounds * epochs,
            "model": "rnn head over each tile's InceptionV3 map (grid mode)",
            "trunk": "pretrained on the pretraining part of crc-tiles, pinned", **trunk.summary(),
            "eval_classes": {name: list(folders) for name, folders in EVAL_CLASSES.items()},
            "items_per_class_cap": per_class,
            "split": split["sites"], "seconds_per_cell": {name: row["seconds"] for name, row in settings.items()},
            **results, "gaps": gaps, "goals_met": goals}
