"""simulations.round_table: the table the demo prints at the end of a federated run."""

import json

from simulations.round_table import SITE_NAMES, round_table


def test_rounds_sites_and_missing_metrics(tmp_path):
    rounds = [{"round": 1, "global": {"loss": 0.6931, "accuracy": 0.5, "auc": None},
               "sites": {"node-1": {"examples": 10, "accuracy": 0.7, "epsilon": 1.234}, "node-2": {"examples": 0}}},
              {"round": 2, "global": {"loss": 0.5, "accuracy": 0.75, "sensitivity": 1.0, "specificity": 0.5,
                                      "auc": 0.8},
               "sites": {"node-1": {"examples": 10, "accuracy": 0.8, "epsilon": 2.5},
                         "node-2": {"examples": 5, "accuracy": 0.6, "epsilon": 0.9}}}]
    (tmp_path / "metrics.json").write_text(json.dumps(rounds))
    (tmp_path / SITE_NAMES).write_text(json.dumps({"node-1": "hospital-a", "node-2": "a-very-long-hospital-name"}))
    header, rule, first, second, legend = round_table(tmp_path).splitlines()
    assert header.split(" | ")[:6] == ["round", "  loss", "  acc", " sens", " spec", "  AUC"]
    assert set(rule) == {"-"} and len(rule) == len(header) == len(first) == len(second)
    # Site columns sorted by hospital name; long names shortened and spelled out below the table.
    assert [cell.strip() for cell in header.split(" | ")[6:]] == ["a-very…al-name", "hospital-a"]
    assert legend == "site columns: a-very…al-name = a-very-long-hospital-name"
    assert [cell.strip() for cell in first.split(" | ")] == ["1", "0.693", "0.50", "n/a", "n/a", "n/a", "sat out",
                                                            "acc 0.70 ε 1.2"]
    assert [cell.strip() for cell in second.split(" | ")][-2:] == ["acc 0.60 ε 0.9", "acc 0.80 ε 2.5"]


def test_no_rounds(tmp_path):
    assert round_table(tmp_path) == "no round completed"
