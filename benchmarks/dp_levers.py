"""What makes federated DP training work here: each lever of fedpath's DP defaults, measured one at a time.

The same federation as ``fed_vs_central`` (crc-tiles AC against T + V on the pinned trunk, 5 sites,
Dirichlet α = 0.5, 10 rounds x 2 local epochs, 1,008 test items, 3 seeds), FedAvg with DP at ε = 3
only, on Flower's Simulation Engine. ``before`` is the settings fedpath had (projection trained at
every site, batch 16, learning rate 1e-3, plain FedAvg); each further arm changes one setting
towards ``fed_vs_central.DEFAULTS``, and ``defaults`` has them all. The table in
``docs/benchmarks.md`` comes from this JSON.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from benchmarks._crc_trunk import CRC_TILES, FULL, QUICK, pretrained_trunk
from benchmarks.fed_vs_central import DEFAULTS, GROUP_SIZE, SEEDS, STORE, TEST_FRACTION, crc_simulation, mean_std
from simulations.experiment import run_experiment
from simulations.experiment_config import Baselines, ExperimentConfig, GridAxes, check_cells
from simulations.sim_config import parse_sim_config
from simulations.sim_runner import SimulationError

EPSILON = 3.0
BEFORE = {"model": {"frozen_projection": False}, "training": {"batch_size": 16, "learning_rate": 1e-3},
          "strategy": {"server_optimizer": {"name": "none"}}}
MOMENTUM = DEFAULTS["strategy"]
ARMS = {
    "before": BEFORE,
    "frozen_projection": {**BEFORE, "model": {"frozen_projection": True}},
    "server_momentum": {**BEFORE, "strategy": MOMENTUM},
    "batch32_lr3e-3": {**BEFORE, "training": DEFAULTS["training"]},
    "defaults": DEFAULTS,
}
"""Each arm's settings over crc_simulation's (model, training, strategy, site privacy)."""


def _arm_document(trunk, quick: bool, settings: dict, per_class: int | None) -> dict:
    sites, rounds, epochs, per_class = (5, 2, 1, 20) if quick else (5, 10, 2, per_class or trunk.plan.eval_per_class)
    if "schedule" in settings and not quick:  # the same local epochs in all, spread over other rounds
        rounds, epochs = settings["schedule"]["rounds"], settings["schedule"]["epochs"]
    document = crc_simulation(trunk, STORE, sites, rounds, epochs, per_class, {"scheme": "dirichlet", "alpha": 0.5},
                              group_size=GROUP_SIZE)
    document["model"].update(settings.get("model", {}))
    document["training"].update(settings.get("training", {}))
    document["strategy"] = settings.get("strategy", document["strategy"])
    if "privacy" in settings:  # the sites' own clipping bound
        document["simulation"]["site_privacy"] = settings["privacy"]
    document["simulation"]["test_fraction"] = 0.2 if quick else TEST_FRACTION
    return document


def _failure(out: Path) -> str:
    """The server's last word on a failed run (status.json), and the sites' refusals in its log."""
    statuses = sorted(out.glob("cells/*/runs/*/status.json"), key=lambda p: p.stat().st_mtime)
    message = json.loads(statuses[-1].read_text()).get("message", "") if statuses else ""
    logs = sorted(out.glob("cells/*/runs/*/*.log"), key=lambda p: p.stat().st_mtime)
    lines = logs[-1].read_text(errors="replace").splitlines() if logs else []
    refusals = sorted({line.strip()[-200:] for line in lines if "refused" in line or "exceeds" in line})
    return " | ".join([message, *refusals[:3]])


def run(quick: bool, per_class: int | None = None, arm_settings: dict | None = None) -> dict:
    """Args: quick: a smoke run; per_class: items of each class (default: all 1,200; ``dp_levers_small``
    uses fewer, for small hospitals); arm_settings: the arms to run (default ``ARMS``; ``dp_tuning``
    varies the DP hyper-parameters around the defaults)."""
    if not CRC_TILES.is_dir():
        return {"skipped": f"data folder absent: {CRC_TILES}"}
    logging.getLogger("fedpath.site").setLevel(logging.ERROR)
    trunk = pretrained_trunk(QUICK if quick else FULL)
    seeds = SEEDS[:1] if quick else SEEDS
    arms = {}
    with tempfile.TemporaryDirectory() as tmp:
        arm_settings = arm_settings or ARMS
        for name, settings in (list(arm_settings.items())[:2] if quick else arm_settings.items()):
            out = Path(tmp) / name
            config = ExperimentConfig(name=name, base=parse_sim_config(_arm_document(trunk, quick, settings, per_class),
                                                                                name),
                                      grid=GridAxes(strategy=("fedavg",), dp=(True,), epsilon=(EPSILON,), seeds=seeds),
                                      baselines=Baselines(centralised=False, local=False), out_dir=out)
            try:
                run_experiment(check_cells(config, name), progress=False)
            except SimulationError as exc:  # an arm the federation refuses is a result too: say why
                arms[name] = {"settings": settings, "failed": str(exc).split(";")[0], "why": _failure(out)}
                print(f"dp_levers {name}: failed: {arms[name]['why']}", flush=True)
                continue
            rows = json.loads((out / "results.json").read_text())
            arm = {"settings": settings, "seconds_per_seed": round(float(np.mean([r["seconds"] for r in rows])), 1),
                   **mean_std(rows)}
            arm["per_seed"] = {r["seed"]: {k: round(r[k], 4) for k in ("accuracy", "auc", "sensitivity", "specificity")}
                               for r in rows}
            arms[name] = arm
            print(f"dp_levers {name}: accuracy {arm['accuracy']:.3f} ± {arm['accuracy_std']:.3f}, "
                  f"AUC {arm['auc']:.3f}", flush=True)
    return {"epsilon": EPSILON, "seeds": list(seeds), "items_per_class": per_class or trunk.plan.eval_per_class,
            "sites": 5, "alpha": 0.5, "rounds": 2 if quick else 10, "local_epochs": 1 if quick else 2,
            "rounds_and_epochs": "as above unless an arm's settings give a schedule",
            **trunk.summary(), "arms": arms}
