"""server.run_recorder: what every exchange leaves in the run folder (a model saved at once, scored one
exchange later), and what a resumed run rebuilds from it."""

import csv
import io
import json

import numpy as np
import pytest

from server.app import initial_model
from server.audit import AuditLog, verify
from server.round_metrics import SiteRound
from server.run_folder import RunFolder
from server.run_recorder import CARD_FORMAT, RunRecorder, round_sites
from shared.checkpoints import load_checkpoint
from shared.refusals import REFUSALS

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


def _site(epsilon: float, refused: int = 0, **more) -> SiteRound:
    return SiteRound(answered=True, refused=refused, disclosed={"epsilon": epsilon, "delta": 1e-5,
                                                                "refused": float(refused), **more})


def _round1() -> dict[str, SiteRound]:
    return {"a": _site(1.0), "b": _site(1.2)}


def _round2() -> dict[str, SiteRound]:
    # b's budget is spent: it sits the round out
    return {"a": _site(2.0), "b": _site(7.9, refused=1, would_spend=9.5, budget_epsilon=8.0)}


EVALUATIONS = [{"accuracy": 0.5, "auc": 0.5}, {"accuracy": 5 / 8, "auc": 0.8}, {"accuracy": 1.0, "auc": 0.6}]
"""The sites' scores of models 0 (initial), 1 and 2."""


def _two_rounds(folder: RunFolder) -> list[list[np.ndarray]]:
    recorder, initial = _recorder(folder)
    models = [initial, [a + 1.0 for a in initial], [a + 2.0 for a in initial]]
    recorder.save_model(0, models[0], {})
    assert recorder.close_model(0, EVALUATIONS[0])["round"] == 0
    recorder.save_model(1, models[1], _round1(), {"round_s": 3.0}, patients=16)
    assert folder.status()["round"] == 1 and not load_checkpoint(
        folder.path / "checkpoints" / "round-0001.npz").card["closed"]  # saved at once, scored later
    first = recorder.close_model(1, EVALUATIONS[1])
    assert first["round"] == 1 and first["global"]["accuracy"] == pytest.approx(5 / 8)
    assert first["global"]["examples"] == 16
    recorder.save_model(2, models[2], _round2(), {"round_s": 4.0}, patients=10)
    second = recorder.close_model(2, EVALUATIONS[2])
    assert second["global"]["accuracy"] == 1.0 and second["global"]["auc"] == pytest.approx(0.6)
    assert recorder.close_model(2, EVALUATIONS[0]) is None  # a second scoring (after a resume) is ignored
    return models


def test_two_rounds_write_checkpoints_audit_reports_and_status(tmp_path, capsys):
    folder = _folder(tmp_path)
    models = _two_rounds(folder)
    assert "round  2" in capsys.readouterr().out  # one console line per scored model

    checkpoints = folder.path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(
        f"{stem}.{ext}" for stem in ("round-0000", "round-0001", "round-0002", "latest", "best")
        for ext in ("npz", "json"))
    names = list(initial_model(folder.config()))
    for round_, model in enumerate(models):
        checkpoint = load_checkpoint(checkpoints / f"round-{round_:04d}.npz")
        assert checkpoint.round == round_ and list(checkpoint.arrays) == names and checkpoint.card["closed"]
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
    assert card["metrics"]["global"]["accuracy"] == 1.0 and card["reproducible_noise"] is False

    assert verify(folder.audit_log) == 3
    records = AuditLog(folder.audit_log).records()
    assert [(r["event"], r["round"]) for r in records] == [("round", 0), ("round", 1), ("round", 2)]
    assert records[1]["sites"] == ["a", "b"] and records[2]["sites"] == ["a"]
    assert records[1]["refusals"] == {} and records[2]["refusals"]["b"]["reason"] == REFUSALS[1]
    assert records[2]["model_sha256"] == card["checkpoint_sha256"]
    assert records[1]["model_sha256"] == load_checkpoint(checkpoints / "round-0001.npz").card["checkpoint_sha256"]
    assert records[2]["metrics"]["accuracy"] == 1.0 and records[2]["metrics"]["examples"] == 10

    metrics = json.loads((folder.path / "metrics.json").read_text())
    assert [entry["round"] for entry in metrics] == [0, 1, 2]
    assert metrics[1]["global"]["auc"] == pytest.approx(0.8)
    assert metrics[2]["sites"]["b"] == {"epsilon": 7.9, "delta": 1e-5, "would_spend": 9.5, "budget_epsilon": 8.0,
                                        "refused": 1, "trained": False}
    assert metrics[2]["timing"] == {"round_s": 4.0}
    rows = list(csv.DictReader(io.StringIO((folder.path / "metrics.csv").read_text())))
    accuracy = {(r["round"], r["scope"]): r["value"] for r in rows if r["metric"] == "accuracy"}
    assert float(accuracy[("1", "global")]) == pytest.approx(5 / 8) and float(accuracy[("2", "global")]) == 1.0
    assert (folder.path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    status = json.loads(folder.status_json.read_text())
    assert status["state"] == "running" and status["round"] == 2 and status["total_rounds"] == 2
    assert status["evaluated_round"] == 2
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
    assert best.round == best_round and best.card["closed"]
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
    assert latest.round == 2 and recorder.latest_closed
    for saved, expected in zip(latest.arrays.values(), models[2], strict=True):
        np.testing.assert_array_equal(saved, expected)
    assert [entry["round"] for entry in recorder.rounds] == [0, 1, 2]
    assert recorder.best_round == 1 and recorder.best == pytest.approx(0.8)
    assert recorder.site_privacy["b"]["epsilon"] == 7.9 and recorder.refusals["b"]["code"] == 1
    assert folder.audit_log.read_bytes() == log_before  # nothing appended
    assert [e["round"] for e in json.loads((folder.path / "metrics.json").read_text())] == [0, 1, 2]  # rewritten

    # the resumed run goes on: its reports cover every round
    recorder.save_model(3, models[2], _round2())
    recorder.close_model(3, EVALUATIONS[1])
    assert [e["round"] for e in json.loads((folder.path / "metrics.json").read_text())] == [0, 1, 2, 3]
    assert verify(folder.audit_log) == 4


def test_a_resumed_run_knows_which_sites_took_part_in_the_last_round(tmp_path):
    # the resumed run's first round waits a while for these (federation.rejoin_wait)
    folder = _folder(tmp_path)
    models = _two_rounds(folder)
    recorder, _ = _recorder(RunFolder.open(folder.path))
    assert round_sites(recorder.resume().card) == {"a", "b"}  # a trained round 2, b refused it
    recorder.save_model(3, models[2], {"a": _site(2.5)})  # b's refusal of round 2 stays on the card
    assert load_checkpoint(folder.path / "checkpoints" / "round-0003.npz").card["refusals"]["b"]["round"] == 2
    assert round_sites(load_checkpoint(folder.path / "checkpoints" / "round-0003.npz").card) == {"a"}
    assert round_sites(load_checkpoint(folder.path / "checkpoints" / "round-0000.npz").card) == set()


def test_a_model_saved_but_not_yet_scored_is_scored_after_a_resume(tmp_path):
    folder = _folder(tmp_path)
    recorder, initial = _recorder(folder)
    recorder.save_model(0, initial, {})
    recorder.close_model(0, EVALUATIONS[0])
    recorder.save_model(1, [a + 1 for a in initial], _round1())  # then the server crashes
    resumed, _ = _recorder(RunFolder.open(folder.path))
    assert resumed.resume().round == 1 and not resumed.latest_closed
    assert [e["round"] for e in resumed.rounds] == [0] and verify(folder.audit_log) == 1
    resumed.close_model(1, EVALUATIONS[1])  # the next exchange scores it
    assert verify(folder.audit_log) == 2 and resumed.latest_closed


def test_resume_on_a_fresh_folder_returns_none(tmp_path):
    folder = _folder(tmp_path)
    recorder, _ = _recorder(folder)
    assert recorder.resume() is None and recorder.rounds == []
    assert not folder.audit_log.exists() and not (folder.path / "metrics.json").exists()


def test_resume_appends_a_missing_audit_record_from_the_card_exactly_once(tmp_path):
    folder = _folder(tmp_path)
    _two_rounds(folder)
    lines = folder.audit_log.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    folder.audit_log.write_bytes(b"".join(lines[:2]))  # crash between closing round 2's card and its record
    assert verify(folder.audit_log) == 2

    recorder, _ = _recorder(folder)
    assert recorder.resume().round == 2
    assert verify(folder.audit_log) == 3
    records = AuditLog(folder.audit_log).records()
    card = load_checkpoint(folder.path / "checkpoints" / "round-0002.npz").card
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[2]["model_sha256"] == card["checkpoint_sha256"] and records[2]["sites"] == ["a"]
    assert records[2]["refusals"]["b"]["code"] == 1 and records[2]["prev_hash"] == records[1]["hash"]

    again, _ = _recorder(folder)
    again.resume()
    assert verify(folder.audit_log) == 3  # not appended twice


def test_a_rejected_update_is_recorded_with_its_reason(tmp_path):
    folder = _folder(tmp_path)
    recorder, initial = _recorder(folder)
    sites = _round1()
    sites["c"] = SiteRound(answered=True, rejected="parameter 'classifier.bias' has non-finite values")
    recorder.save_model(1, initial, sites)
    recorder.close_model(1, None)  # not scored this time (evaluate_every)
    (record,) = [json.loads(line) for line in folder.audit_log.read_text().splitlines()]
    assert record["rejected_updates"] == {"c": "parameter 'classifier.bias' has non-finite values"}
    assert "c" not in record["sites"]  # it did not enter the model
    assert record["metrics"]["evaluated"] is False
    card = json.loads((folder.path / "checkpoints" / "round-0001.json").read_text())
    assert card["rejected_updates"] == record["rejected_updates"]
