"""simulations.experiment_report: tables of mean ± std over seeds, the results files and the plots."""

import csv
import json
import math

import pytest

from simulations.experiment_report import mean_std, summarise, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(strategy, seed, accuracy, auc, dp=False, epsilon_target=None, alpha=0.5, sites=3, **extra):
    setting = f"{strategy}_{'dp' if dp else 'nodp'}{epsilon_target or ''}_alpha{alpha}_sites{sites}"
    row = {"cell": f"{setting}_seed{seed}", "setting": setting, "strategy": strategy, "proximal_mu": None,
           "dp": dp, "epsilon_target": epsilon_target, "alpha": alpha, "sites": sites, "seed": seed,
           "accuracy": accuracy, "auc": auc, "sensitivity": 0.7, "specificity": 0.8, "balanced_accuracy": 0.75,
           "loss": 0.5, "epsilon": epsilon_target and epsilon_target * 0.99, "seconds": 1.0}
    if strategy in ("fedavg", "fedprox"):
        row["curve"] = [{"round": r, "accuracy": accuracy - 0.1 / r, "auc": auc - 0.1 / r} for r in (1, 2, 3)]
    return {**row, **extra}


def _table() -> list[dict]:
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.02)):
        for alpha in (0.1, 1.0):
            rows.append(_row("fedavg", seed, 0.80 + shift, 0.85 + shift, alpha=alpha))
            rows.append(_row("fedavg", seed, 0.70 + shift, 0.75 + shift, dp=True, epsilon_target=8.0, alpha=alpha))
            rows.append(_row("fedavg", seed, 0.60 + shift, 0.65 + shift, dp=True, epsilon_target=1.0, alpha=alpha))
            rows.append(_row("centralised", seed, 0.82 + shift, 0.90, alpha=alpha))
            rows.append(_row("local", seed, 0.66, math.nan, alpha=alpha,
                             per_site={"site-1": {"accuracy": 0.6, "auc": 0.7}, "site-2": {"accuracy": 0.72}}))
    return rows


def test_mean_std_skips_missing_values():
    assert mean_std([0.5, None, math.nan, 0.7]) == pytest.approx((0.6, 0.1414214, 2), rel=1e-5)
    assert mean_std([0.4]) == (0.4, 0.0, 1)
    mean, std, count = mean_std([None, math.nan])
    assert math.isnan(mean) and math.isnan(std) and count == 0


def test_summary_groups_seeds_per_setting():
    summary = summarise(_table())
    assert len(summary) == 10
    fedavg = next(s for s in summary if s["strategy"] == "fedavg" and not s["dp"] and s["alpha"] == 0.1)
    assert fedavg["seeds"] == [0, 1]
    assert fedavg["accuracy"] == pytest.approx((0.81, 0.0141421, 2), rel=1e-5)
    local = next(s for s in summary if s["strategy"] == "local")
    assert local["auc"][2] == 0  # nan AUC stays absent


def test_write_report_files(tmp_path):
    paths = write_report(_table(), tmp_path, title="Test grid")
    assert sorted(p.name for p in paths) == sorted(["report.md", "results.json", "results.csv", "curves.png",
                                                    "alpha.png", "epsilon.png"])
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Test grid")
    assert "| strategy | DP | sites | α | seeds | accuracy | AUC | sensitivity | specificity | ε spent |" in report
    assert "| fedavg | ε=8 | 3 | 0.1 | 2 | 0.710 ± 0.014 | 0.760 ± 0.014 | 0.700 ± 0.000 | 0.800 ± 0.000 |" in report
    assert "| local-only (mean of sites) | no DP | 3 | 1 | 2 | 0.660 ± 0.000 | n/a |" in report
    assert "| no DP, 3 sites, α 0.1 | site-2 | 0.720 ± 0.000 | n/a |" in report  # per-site table
    for name in ("curves.png", "alpha.png", "epsilon.png"):
        assert f"]({name})" in report
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000

    stored = json.loads((tmp_path / "results.json").read_text())
    assert len(stored) == 20 and all("cell" in row for row in stored)
    assert next(r for r in stored if r["strategy"] == "local")["auc"] is None  # nan as null: strict JSON
    with open(tmp_path / "results.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert len(lines) == 20
    first = next(r for r in lines if r["cell"] == "fedavg_nodp_alpha0.1_sites3_seed0")
    assert first["accuracy"] == "0.8" and first["rounds"] == "3" and first["epsilon"] == ""


def test_report_without_federated_or_dp_cells(tmp_path):
    """A table of baselines only still gives every file; the empty plots say why they are empty."""
    write_report([_row("centralised", 0, 0.8, 0.9, alpha=None)], tmp_path)
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_SIGNATURE)
    assert "| centralised | no DP | 3 | — | 1 | 0.800 | 0.900 |" in (tmp_path / "report.md").read_text()
