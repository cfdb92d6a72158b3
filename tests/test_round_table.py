"""simulations.round_table: the table the demo prints at the end of a federated run."""

import json

import yaml

from client.site_config import load_site_config
from client.site_rounds import record_round
from simulations.round_table import SITE_NAMES, round_table


def _site(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "manifest.csv").write_text("slide,label\n")
    (folder / "site.yaml").write_text(yaml.safe_dump({"name": name, "data": {"manifest": "manifest.csv"}}))
    return load_site_config(folder / "site.yaml")


def test_rounds_sites_disclosed_numbers_and_the_sites_own_accuracy(tmp_path):
    run = tmp_path / "20260101-000000"
    run.mkdir()
    rounds = [{"round": 0, "global": {"accuracy": 0.5, "balanced_accuracy": 0.5, "auc": None}, "sites": {}},
              {"round": 1, "global": {"accuracy": 0.75, "balanced_accuracy": 0.7, "sensitivity": 1.0,
                                      "specificity": 0.5, "auc": 0.8},
               "sites": {"node-1": {"epsilon": 2.5, "refused": 0, "trained": True},
                         "node-2": {"refused": 1, "trained": False}}}]
    (run / "metrics.json").write_text(json.dumps(rounds))
    (run / SITE_NAMES).write_text(json.dumps({"node-1": "hospital-a", "node-2": "a-very-long-hospital-name"}))
    hospital = _site(tmp_path, "hospital-a")
    record_round(hospital, run.name, {"round": 2, "val": {"accuracy": 0.9}})  # exchange 2 scored model 1
    header, rule, zero, first, note, legend = round_table(run, {"hospital-a": hospital}).splitlines()
    assert header.split(" | ")[:6] == ["round", "  acc", "  bal", " sens", " spec", "  AUC"]
    assert set(rule) == {"-"} and len(rule) == len(header) == len(zero) == len(first)
    # Site columns sorted by hospital name; long names shortened and spelled out below the table.
    assert [cell.strip() for cell in header.split(" | ")[6:]] == ["a-very-…tal-name", "hospital-a"]
    assert [cell.strip() for cell in zero.split(" | ")][:6] == ["0", "0.50", "0.50", "n/a", "n/a", "n/a"]
    assert [cell.strip() for cell in first.split(" | ")] == ["1", "0.75", "0.70", "1.00", "0.50", "0.80", "sat out",
                                                            "acc 0.90 ε 2.5"]
    assert "masked sum of the sites' noisy counts" in note and "the site's own exact validation accuracy" in note
    assert legend == "site columns: a-very-…tal-name = a-very-long-hospital-name"


def test_no_rounds(tmp_path):
    assert round_table(tmp_path) == "no round completed"
