"""Is federated training worth it? FedAvg against all data pooled and each hospital alone, with and without DP.

Real colorectal tiles, adenocarcinoma (AC) against adenoma (T + V), on the consortium's trunk:
InceptionV3 pretrained on one part of ``../shared/data/crc-tiles`` before any round, as a consortium
would on public data, and pinned (``model.trunk_sha256``); its frozen projection comes with it. The
simulation sees only the disjoint evaluation part (``benchmarks/_crc_trunk.py``, shared with
``encoder_transfer``), at the pretraining's tile size: 1,200 tiles of AC and 1,200 of T + V, one tile
per item (the privacy unit; the data has no patient ids), 5 virtual hospitals with Dirichlet(α = 0.5)
label skew, 42 % of the items (1,008) held out as the one test set of every model of a seed. Run as
an experiment (``simulations/experiment.py``) over 3 seeds (split, dealing, training): FedAvg on
Flower's Simulation Engine without DP and with DP at ε = 3 and ε = 8, beside the centralised and
local-only baselines trained with the same head, the same local optimiser and the same budget of
epochs (rounds x local epochs). The settings are fedpath's defaults for DP (``DEFAULTS``, chosen in
``docs/benchmarks.md``): frozen projection, server momentum, batch 32, learning rate 3e-3.
``fed_vs_central_unseen`` runs the same on the trunk pretrained only on classes never evaluated (H and S).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._crc_trunk import CRC_TILES, EVAL_CLASSES, FULL, QUICK, WORK, CrcTrunk, TrunkPlan, pretrained_trunk
from simulations.experiment import run_experiment
from simulations.experiment_config import Baselines, ExperimentConfig, GridAxes, check_cells
from simulations.sim_config import parse_sim_config

GROUP_SIZE = 1  # tiles per item: at 96 px a tile is a 1 x 1 map, cheap enough to extract one at a time
STORE = WORK / "crc-tiles-features"
"""The feature store, kept between runs (and shared with ``membership_inference``): tile vectors are
not what these benchmarks measure. Delete it to recompute them."""
SEEDS = (0, 1, 2)
EPSILONS = (3.0, 8.0)
TEST_FRACTION = 0.42  # of 2,400 items: 1,008 test items
DEFAULTS = {"model": {"frozen_projection": True},
            "training": {"batch_size": 32, "learning_rate": 3e-3},
            "strategy": {"server_optimizer": {"name": "momentum", "learning_rate": 1.0, "momentum": 0.9}}}
"""fedpath's measured settings for federated DP (configs/ and `make demo` use the same)."""
# Gaps to centralised without DP (fractions): the goals.
GOALS = {"fedavg_minus_central": -0.01, "fedavg_dp3_minus_central": -0.02, "fedavg_dp8_minus_central": -0.01}
GOAL_CENTRAL = 0.95
GOAL_DP3_SENS_SPEC = 0.85
GOAL_STD_FEDAVG = 0.02


def crc_simulation(trunk: CrcTrunk, store: Path, sites: int, rounds: int, epochs: int, items_per_class: int | None,
                   partition: dict, training: dict | None = None, group_size: int = 1) -> dict:
    """The sim.yaml settings of a simulation on the evaluation part of crc-tiles (AC against T + V)
    with the pretrained trunk pinned, as a mapping."""
    return {"name": "crc-tiles AC vs T+V", "classes": ["adenoma", "adenocarcinoma"],
            "positive_class": "adenocarcinoma",
            "federation": {"rounds": rounds, "min_sites": sites, "round_timeout": 600},
            "model": {"core": "rnn", "mode": "grid", "trunk_sha256": trunk.sha256, **DEFAULTS["model"]},
            "training": {"epochs": epochs, **DEFAULTS["training"], **(training or {})},
            "strategy": DEFAULTS["strategy"],
            "privacy": {"epsilon": 8.0},
            "simulation": {"sites": sites, "seed": 0, "test_fraction": 0.2, "val_fraction": 0.1,
                           "data": {"source": "tiles", "tile_folder": str(trunk.eval_dir),
                                    "group_size": group_size, "items_per_class": items_per_class},
                           "partition": partition, "tiling": {"tile_size": trunk.plan.settings.tile_size},
                           "features": {"backbone_weights": str(trunk.weights), "cache_dir": str(store),
                                        "batch_size": 32, "num_workers": 1}}}


def _metrics(row: dict) -> dict:
    keep = ("accuracy", "auc", "sensitivity", "specificity", "epsilon")
    return {key: None if row.get(key) is None else round(row[key], 4) for key in keep}


def mean_std(rows: list[dict]) -> dict:
    """Mean and standard deviation over seeds of each metric."""
    out = {}
    for key in ("accuracy", "auc", "sensitivity", "specificity", "epsilon"):
        values = [row[key] for row in rows if row.get(key) is not None]
        if values:
            out[key] = round(float(np.mean(values)), 4)
            out[f"{key}_std"] = round(float(np.std(values)), 4)
    return out


def run(quick: bool, trunk_plan: TrunkPlan | None = None) -> dict:
    if not CRC_TILES.is_dir():
        return {"skipped": f"data folder absent: {CRC_TILES}"}
    logging.getLogger("fedpath.site").setLevel(logging.ERROR)
    trunk = pretrained_trunk(trunk_plan or (QUICK if quick else FULL))
    sites, rounds, epochs, per_class = (5, 2, 1, 20) if quick else (5, 10, 2, trunk.plan.eval_per_class)
    seeds = SEEDS[:1] if quick else SEEDS
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        document = crc_simulation(trunk, STORE, sites, rounds, epochs, per_class,
                                  {"scheme": "dirichlet", "alpha": 0.5}, group_size=GROUP_SIZE)
        document["simulation"]["test_fraction"] = 0.2 if quick else TEST_FRACTION
        config = ExperimentConfig(name="fed_vs_central", base=parse_sim_config(document, "fed_vs_central"),
                                  grid=GridAxes(strategy=("fedavg",), dp=(False, True), epsilon=EPSILONS, seeds=seeds),
                                  baselines=Baselines(centralised=True, local=True), out_dir=root / "experiment")
        run_experiment(check_cells(config, "fed_vs_central"), progress=False)
        rows = json.loads((root / "experiment" / "results.json").read_text())
        splits = {path.parent.name: json.loads(path.read_text())["sites"]
                  for path in (root / "experiment" / "data").glob("*/split.json")}
        # every arm of a seed is scored on its seed's one test set
        test_items = sorted({len(json.loads(path.read_text())["items"])
                             for path in (root / "experiment" / "data").glob("*/test/cache/index.json")})
    arms = {"centralised": "centralised_nodp", "fedavg": "fedavg_nodp", "local_only_mean": "local_nodp",
            **{f"{name}_dp{eps:g}": f"{prefix}_dp-eps{eps:g}" for eps in EPSILONS
               for name, prefix in (("centralised", "centralised"), ("fedavg", "fedavg"),
                                    ("local_only_mean", "local"))}}
    results, per_seed = {}, {}
    for arm, setting in arms.items():
        chosen = [row for row in rows if row["setting"].startswith(setting + "_")]
        per_seed[arm] = {row["seed"]: _metrics(row) for row in chosen}
        results[arm] = {**mean_std(chosen), "seeds": len(chosen),
                        "seconds_per_seed": round(float(np.mean([row["seconds"] for row in chosen])), 1)}
        if arm.startswith("fedavg"):
            results[arm]["curve_seed0"] = [{k: round(v, 4) if isinstance(v, float) else v for k, v in point.items()
                                            if k in ("round", "accuracy", "auc")}
                                           for point in next(r for r in chosen if r["seed"] == seeds[0])["curve"]]
    gaps = {}
    for name, arm in (("fedavg_minus_central", "fedavg"), ("fedavg_dp3_minus_central", "fedavg_dp3"),
                      ("fedavg_dp8_minus_central", "fedavg_dp8")):
        for metric in ("accuracy", "auc"):
            gaps[f"{name}_{metric}"] = round(results[arm][metric] - results["centralised"][metric], 4)
    goals = {name: {"limit": limit, **{metric: gaps[f"{name}_{metric}"] >= limit for metric in ("accuracy", "auc")}}
             for name, limit in GOALS.items()}
    goals["centralised_at_least"] = {"limit": GOAL_CENTRAL, "met": results["centralised"]["accuracy"] >= GOAL_CENTRAL}
    goals["fedavg_dp3_sensitivity_specificity"] = {
        "limit": GOAL_DP3_SENS_SPEC, "met": min(results["fedavg_dp3"]["sensitivity"],
                                                results["fedavg_dp3"]["specificity"]) >= GOAL_DP3_SENS_SPEC}
    # a spread needs seeds: with one (--quick) there is none to judge, and 0 <= limit would always pass
    goals["fedavg_std"] = {"limit": GOAL_STD_FEDAVG, "met": None if len(seeds) < 3 else
                           results["fedavg"]["accuracy_std"] <= GOAL_STD_FEDAVG,
                           **({"why_not_judged": f"{len(seeds)} seed(s); a spread needs at least 3"}
                              if len(seeds) < 3 else {})}
    return {"tile_size": trunk.plan.settings.tile_size, "group_size": GROUP_SIZE, "sites": sites, "alpha": 0.5,
            "rounds": rounds, "local_epochs": epochs, "epoch_budget": rounds * epochs, "seeds": list(seeds),
            "settings": DEFAULTS, "test_items": test_items,
            "model": "rnn head over each tile's InceptionV3 map (grid mode), projection frozen",
            "trunk": ("pretrained only on H and S (classes never evaluated), pinned" if trunk.plan.pretrain_classes
                      else "pretrained on the pretraining part of crc-tiles (all five classes), pinned"),
            **trunk.summary(), "eval_classes": {name: list(folders) for name, folders in EVAL_CLASSES.items()},
            "items_per_class_cap": per_class, "split_seed0": next(iter(splits.values()), None),
            **results, "per_seed": per_seed, "gaps": gaps, "goals_met": goals}

