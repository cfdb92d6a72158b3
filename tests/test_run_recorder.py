"""server.run_recorder: what every round leaves in the run folder, and what a resumed run rebuilds from it."""

import csv
import io
import json

import numpy as np
import pytest

from server.app import initial_model
from server.audit import AuditLog, verify
from server.round_metrics import SiteRound
from server.run_folder import RunFolder
from server.run_recorder import CARD_FORMAT, RunRecorder
from shared.checkpoints import load_checkpoint
from shared.round_plan import REFUSALS

SERVER_YAML = """\
name: test consortium
classes: [adenoma, adenocarcinoma]
positive_class: adenocarcinoma
federation:
  rounds: 2
  best_metric: {best_metric}
model:
  projection: 8
  hidden: 4
"""


def _folder(tmp_path, best_metric="auc") -> RunFolder:
    path = tmp_path / "server.yaml"
    path.write_text(SERVER_YAML.format(best_metric=best_metric))
    return RunFolder.create(path)


def _recorder(folder: RunFolder) -> tuple[RunRecorder, list[np.ndarray]]:
    config = folder.config()
    initial = initial_model(config)
    return RunRecorder(folder, config, list(initial)), list(initial.values())


def _round1() -> dict[str, SiteRound]:
    # pooled confusion [[3, 1], [2, 2]]: accuracy 5/8; AUC 0.8
    return {"a": SiteRound(examples=10, train_loss=0.7, epsilon=1.0, delta=1e-5, val_slides=4, val_loss=0.6,
                           eval={"auc": 0.8}, confusion=np.array([[2.0, 0.0], [1.0, 1.0]]), train_seconds=1.0),
            "b": SiteRound(examples=6, train_loss=0.9, epsilon=1.2, delta=1e-5, val_slides=4, val_loss=0.8,
                           eval={"auc": 0.8}, confusion=np.array([[1.0, 1.0], [1.0, 1.0]]), train_seconds=2.0)}


def _round2() -> dict[str, SiteRound]:
    # b's budget is spent: it sits the round out but still evaluates. Accuracy 1.0, AUC 0.6
    return {"a": SiteRound(examples=10, train_loss=0.5, epsilon=2.0, delta=1e-5, val_slides=4, val_loss=0.4,
                           eval={"auc": 0.6}, confusion=np.array([[2.0, 0.0], [0.0, 2.0]])),
            "b": SiteRound(examples=0, refused=1, epsilon=7.9, delta=1e-5, would_spend=9.5, budget_epsilon=8.0,
                           val_slides=4, val_loss=0.5, eval={"auc": 0.6}, confusion=np.array([[2.0, 0.0], [0.0, 2.0]]))}


def _two_rounds(folder: RunFolder) -> list[list[np.ndarray]]:
    recorder, initial = _recorder(folder)
    models = [[a + 1.0 for a in initial], [a + 2.0 for a in initial]]
    first = recorder.finish_round(1, models[0], _round1(), {"round_s": 3.0})
    assert first["round"] == 1 and first["global"]["accuracy"] == pytest.approx(5 / 8)
    second = recorder.finish_round(2, models[1], _round2(), {"round_s": 4.0})
    assert second["global"]["accuracy"] == 1.0 and second["global"]["auc"] == pytest.approx(0.6)
    assert second["global"]["examples"] == 10 and second["global"]["val_slides"] == 8
    return models


def test_two_rounds_write_checkpoints_audit_reports_and_status(tmp_path, capsys):
    folder = _folder(tmp_path)
    models = _two_rounds(folder)
    assert "round  2" in capsys.readouterr().out  # one console line per round

    checkpoints = folder.path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(
        f"{stem}.{ext}" for stem in ("round-0001", "round-0002", "latest", "best") for ext in ("npz", "json"))
    names = list(initial_model(folder.config()))
    for round_, model in ((1, models[0]), (2, models[1])):
        checkpoint = load_checkpoint(checkpoints / f"round-{round_:04d}.npz")
        assert checkpoint.round == round_ and list(checkpoint.arrays) == names
        for saved, expected in zip(checkpoint.arrays.values(), model, strict=True):
            np.testing.assert_array_equal(saved, expected)
    latest = load_checkpoint(checkpoints / "latest.npz")
    assert latest.round == 2
    card = latest.card
    assert card["format"] == CARD_FORMAT and card["federation_id"] == folder.federation_id
    assert card["classes"] == ["adenoma", "adenocarcinoma"] and card["positive_class"] == "adenocarcinoma"
    assert card["config_sha256"] == folder.run_info()["config_sha256"] and card["total_rounds"] == 2
    assert card["sites_this_round"] == ["a"] and card["sites_all"] == ["a", "b"]
    assert card["privacy"] == {"a": {"epsilon": 2.0, "delta": 1e-5}, "b": {"epsilon": 7.9, "delta": 1e-5}}
    assert card["refusals"]["b"]["code"] == 1 and card["refusals"]["b"]["round"] == 2

    assert verify(folder.audit_log) == 2
    records = AuditLog(folder.audit_log).records()
    assert [(r["event"], r["round"]) for r in records] == [("round", 1), ("round", 2)]
    assert records[0]["sites"] == ["a", "b"] and records[1]["sites"] == ["a"]
    assert records[0]["refusals"] == {} and records[1]["refusals"]["b"]["reason"] == REFUSALS[1]
    assert records[1]["model_sha256"] == card["checkpoint_sha256"]
    assert records[0]["model_sha256"] == load_checkpoint(checkpoints / "round-0001.npz").card["checkpoint_sha256"]
    assert records[1]["metrics"]["accuracy"] == 1.0

    metrics = json.loads((folder.path / "metrics.json").read_text())
    assert [entry["round"] for entry in metrics] == [1, 2]
    assert metrics[0]["global"]["auc"] == pytest.approx(0.8) and metrics[1]["sites"]["b"]["examples"] == 0
    assert metrics[1]["timing"] == {"round_s": 4.0}
    rows = list(csv.DictReader(io.StringIO((folder.path / "metrics.csv").read_text())))
    accuracy = {(r["round"], r["scope"]): r["value"] for r in rows if r["metric"] == "accuracy"}
    assert float(accuracy[("1", "global")]) == pytest.approx(5 / 8) and float(accuracy[("2", "global")]) == 1.0
    assert (folder.path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    status = json.loads(folder.status_json.read_text())
    assert status["state"] == "running" and status["round"] == 2 and status["total_rounds"] == 2
    assert status["audit_last_hash"] == records[-1]["hash"] and status["best_round"] == 1
    assert status["sites"]["a"] == {"epsilon": 2.0, "delta": 1e-5, "in_last_round": True, "refusal": None}
    refusal = status["sites"]["b"]["refusal"]
    assert status["sites"]["b"]["epsilon"] == 7.9 and status["sites"]["b"]["in_last_round"] is False
    assert refusal == {"round": 2, "code": 1, "reason": REFUSALS[1], "epsilon_spent": 7.9, "would_spend": 9.5,
                       "budget_epsilon": 8.0}


@pytest.mark.parametrize("best_metric, best_round", [("auc", 1), ("accuracy", 2)])
def test_best_follows_the_best_metric(tmp_path, best_metric, best_round):
    folder = _folder(tmp_path, best_metric)
    _two_rounds(folder)
    best = load_checkpoint(folder.path / "checkpoints" / "best.npz")
    assert best.round == best_round
    assert best.card["checkpoint_sha256"] == load_checkpoint(
        folder.path / "checkpoints" / f"round-{best_round:04d}.npz").card["checkpoint_sha256"]
    assert folder.status()["best_round"] == best_round


def test_resume_returns_the_latest_checkpoint_and_rebuilds_the_rounds(tmp_path):
    folder = _folder(tmp_path)
    models = _two_rounds(folder)
    log_before = folder.audit_log.read_bytes()
    (folder.path / "metrics.json").unlink()

    recorder, _ = _recorder(RunFolder.open(folder.path))
    latest = recorder.resume()
    assert latest.round == 2
    for saved, expected in zip(latest.arrays.values(), models[1], strict=True):
        np.testing.assert_array_equal(saved, expected)
    assert [entry["round"] for entry in recorder.rounds] == [1, 2]
    assert recorder.best_round == 1 and recorder.best == pytest.approx(0.8)
    assert recorder.site_privacy["b"]["epsilon"] == 7.9 and recorder.refusals["b"]["code"] == 1
    assert folder.audit_log.read_bytes() == log_before  # nothing appended
    assert [e["round"] for e in json.loads((folder.path / "metrics.json").read_text())] == [1, 2]  # rewritten

    # the resumed run goes on: its reports cover every round
    recorder.finish_round(3, models[1], _round2())
    assert [e["round"] for e in json.loads((folder.path / "metrics.json").read_text())] == [1, 2, 3]
    assert verify(folder.audit_log) == 3


def test_resume_on_a_fresh_folder_returns_none(tmp_path):
    folder = _folder(tmp_path)
    recorder, _ = _recorder(folder)
    assert recorder.resume() is None and recorder.rounds == []
    assert not folder.audit_log.exists() and not (folder.path / "metrics.json").exists()


def test_resume_appends_a_missing_audit_record_from_the_card_exactly_once(tmp_path):
    folder = _folder(tmp_path)
    _two_rounds(folder)
    lines = folder.audit_log.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2
    folder.audit_log.write_bytes(lines[0])  # crash between round 2's checkpoint and its audit record
    assert verify(folder.audit_log) == 1

    recorder, _ = _recorder(folder)
    assert recorder.resume().round == 2
    assert verify(folder.audit_log) == 2
    records = AuditLog(folder.audit_log).records()
    card = load_checkpoint(folder.path / "checkpoints" / "round-0002.npz").card
    assert [r["round"] for r in records] == [1, 2]
    assert records[1]["model_sha256"] == card["checkpoint_sha256"] and records[1]["sites"] == ["a"]
    assert records[1]["refusals"]["b"]["code"] == 1 and records[1]["prev_hash"] == records[0]["hash"]

    again, _ = _recorder(folder)
    again.resume()
    assert verify(folder.audit_log) == 2  # not appended twice


def test_a_rejected_update_is_recorded_with_its_reason(tmp_path):
    folder = _folder(tmp_path)
    recorder, initial = _recorder(folder)
    sites = _round1()
    sites["c"] = SiteRound(examples=0, rejected="parameter 'classifier.bias' has non-finite values")
    recorder.finish_round(1, initial, sites)
    (record,) = [json.loads(line) for line in folder.audit_log.read_text().splitlines()]
    assert record["rejected_updates"] == {"c": "parameter 'classifier.bias' has non-finite values"}
    assert "c" not in record["sites"]  # it did not enter the model
    card = json.loads((folder.path / "checkpoints" / "round-0001.json").read_text())
    assert card["rejected_updates"] == record["rejected_updates"]
