"""server.reports: the three report files, missing metrics, and the console line."""

import csv
import json
import math

from server.reports import round_line, write_reports

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rounds() -> list[dict]:
    return [
        {"round": 1,
         "global": {"loss": 0.69, "accuracy": 0.5, "sensitivity": 0.4, "specificity": 0.6, "auc": math.nan},
         "sites": {"hospital-a": {"train_loss": 0.7, "loss": 0.68, "accuracy": 0.55, "epsilon": 1.2},
                   "hospital, b": {"train_loss": 0.72, "auc": None, "epsilon": 1.5}}},
        {"round": 2,
         "global": {"loss": 0.512, "accuracy": 0.7333, "balanced_accuracy": 0.73, "sensitivity": 0.7,
                    "specificity": 0.76, "auc": 0.801},
         "sites": {"hospital-a": {"train_loss": 0.55, "loss": 0.5, "accuracy": 0.7, "auc": 0.8, "epsilon": 2.1,
                                  "trained": True},
                   "hospital, b": {"train_loss": 0.6, "loss": 0.52, "accuracy": 0.75, "auc": 0.79, "epsilon": 2.906,
                                   "trained": True}}},
    ]


def _csv(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000  # three labelled panels, not an empty canvas


def test_write_reports_files(tmp_path):
    rounds = _rounds()
    write_reports(tmp_path, rounds)

    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored[1] == rounds[1]
    assert stored[0]["global"]["auc"] is None  # nan as null: strict JSON

    rows = _csv(tmp_path)
    assert list(rows[0]) == ["round", "scope", "metric", "value"]
    assert len(rows) == sum(len(e["global"]) + sum(map(len, e["sites"].values())) for e in rounds) == 30
    assert {"round": "2", "scope": "global", "metric": "auc", "value": "0.801"} in rows
    assert {"round": "2", "scope": "hospital, b", "metric": "epsilon", "value": "2.906"} in rows
    assert {"round": "1", "scope": "global", "metric": "auc", "value": ""} in rows
    assert {"round": "1", "scope": "hospital, b", "metric": "auc", "value": ""} in rows

    _assert_png(tmp_path / "curves.png")
    assert not [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def test_single_round_with_missing_metrics(tmp_path):
    rounds = [{"round": 0, "global": {"loss": None}, "sites": {"a": {"epsilon": 0.3}}}]
    write_reports(tmp_path, rounds)
    assert len(_csv(tmp_path)) == 2
    assert json.loads((tmp_path / "metrics.json").read_text()) == rounds
    _assert_png(tmp_path / "curves.png")


def test_round_line_formats_every_field():
    assert round_line(_rounds()[1]) == (
        "round  2 | sites 2 | acc 0.733 | bal 0.730 | sens 0.700 | spec 0.760 | AUC 0.801 | ε max 2.91")


def test_round_line_shows_missing_as_na():
    line = round_line({"round": 12, "global": {"auc": math.nan, "accuracy": None},
                       "sites": {"a": {"epsilon": None, "trained": True}}})
    assert line == "round 12 | sites 1 | acc n/a | bal n/a | sens n/a | spec n/a | AUC n/a | ε max n/a"
