"""`fedpath-sim experiment`: a grid of simulations, the baselines beside them, and the report.

    OUT/data/<data setting>/   the virtual hospitals of one data setting (``materialise``), shared
                               by every cell that uses it; vectors come from the feature store
    OUT/cells/<cell>/          the cell's run folder(s) and ``result.json``, written last
    OUT/report.md, results.json, results.csv, curves.png, alpha.png, epsilon.png

A cell whose ``result.json`` is present and was made from the same cell config is not run
again, so an interrupted experiment resumes with the next cell; a cell that was cut short is
started afresh. Every model, federated or baseline, is scored by ``evaluate_checkpoint`` on the
held-out test set of its data setting. A federated cell reports its last round's model (the
baselines have no model selection either) and the test metrics after every round for the curves.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from shared.atomic_files import atomic_write_json
from shared.checkpoints import saved_rounds
from shared.metrics import format_metric, to_jsonable
from simulations.baselines import FINAL_METRICS, BaselinePlan, centralised, local_only
from simulations.experiment_config import Cell, ExperimentConfig, cell_config
from simulations.experiment_report import write_report
from simulations.materialise import SimLayout, materialise
from simulations.sim_config import SimConfig
from simulations.sim_runner import cached_items, evaluate_checkpoint, run_simulation

RESULT = "result.json"


def run_experiment(config: ExperimentConfig, progress: bool = True) -> list[Path]:
    """Run every cell not done yet, then write the report; returns the report's files."""
    out = Path(config.out_dir)
    cells = config.cells()
    layouts: dict[str, SimLayout] = {}
    rows = []
    for number, cell in enumerate(cells, 1):
        sim = cell_config(config.sim, cell)
        step = f"[{number}/{len(cells)}] {cell.name}"
        folder = out / "cells" / cell.name
        fingerprint = config_sha256(sim)
        done = _finished(folder / RESULT, fingerprint)
        if done is not None:
            rows.append(done)
            _say(progress, f"{step}: done earlier, kept: {summary_line(done)}")
            continue
        if folder.exists():  # a cell cut short, or run with another config: start it afresh
            shutil.rmtree(folder)
        key = data_setting(sim)
        if key not in layouts:
            _say(progress, f"data setting {key}: materialising {sim.simulation.sites} virtual hospitals")
            layouts[key] = materialise(sim, out / "data" / key, progress=progress)
        _say(progress, f"{step}: running")
        start = time.perf_counter()
        row = {**cell.row(), **run_cell(cell, sim, layouts[key], folder),
               "seconds": round(time.perf_counter() - start, 1), "config_sha256": fingerprint}
        row = to_jsonable(row)
        atomic_write_json(folder / RESULT, row)
        rows.append(row)
        _say(progress, f"{step}: {summary_line(row)}")
    return write_report(rows, out, title=f"Experiment: {config.name}")


def run_cell(cell: Cell, sim: SimConfig, layout: SimLayout, folder: Path) -> dict:
    """Train the cell's model(s) and score them on the test set: the row's metrics."""
    if cell.strategy == "centralised":
        return centralised(layout, BaselinePlan.of(sim), folder)
    if cell.strategy == "local":
        return local_only(layout, BaselinePlan.of(sim), folder)
    run_dir = run_simulation(sim, layout, folder)
    test = cached_items(layout.test_config, "test", sim.classes)  # read once, not once per round
    curve = [{"round": r, **_final(evaluate_checkpoint(path, layout, test))} for r, path in saved_rounds(run_dir)]
    return {**{k: v for k, v in curve[-1].items() if k != "round"}, "epsilon": epsilon_spent(run_dir),
            "curve": curve, "run_dir": str(run_dir)}


def epsilon_spent(run_dir: Path) -> float | None:
    """The largest ε any site had spent by the end of the run (its last model card), None without DP."""
    last = saved_rounds(run_dir)[-1][1]
    card = json.loads(last.with_suffix(".json").read_text())
    spent = [site["epsilon"] for site in card.get("privacy", {}).values() if site.get("epsilon") is not None]
    return max(spent) if spent else None


def data_setting(sim: SimConfig) -> str:
    """A folder name for the virtual hospitals a cell needs: readable, and unique per simulation section."""
    section = sim.simulation
    partition = section.partition
    skew = {"iid": "iid", "dirichlet": f"alpha{partition.alpha:g}", "quantity": f"beta{partition.beta:g}"}
    digest = hashlib.sha256(json.dumps(to_jsonable({"classes": sim.classes, "simulation": asdict(section),
                                                    "privacy": asdict(sim.privacy), "rounds": sim.federation.rounds}),
                                       sort_keys=True, default=str).encode()).hexdigest()[:8]
    privacy = "dp" if section.site_privacy.enabled else "nodp"
    return f"sites{section.sites}_{skew[partition.scheme]}_seed{section.seed}_{privacy}-{digest}"


def config_sha256(sim: SimConfig) -> str:
    return hashlib.sha256(json.dumps(to_jsonable(sim.as_dict()), sort_keys=True, default=str).encode()).hexdigest()


def summary_line(row: dict) -> str:
    return (f"test accuracy {format_metric(row.get('accuracy'))}, AUC {format_metric(row.get('auc'))}, "
            f"ε {format_metric(row.get('epsilon'), 2)} "
            f"({row['seconds']:.0f} s)")


def _final(metrics: dict) -> dict:
    return {key: metrics.get(key) for key in FINAL_METRICS}


def _finished(result: Path, fingerprint: str) -> dict | None:
    try:
        row = json.loads(result.read_text())
    except (OSError, ValueError):
        return None
    return row if row.get("config_sha256") == fingerprint else None


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, flush=True)
