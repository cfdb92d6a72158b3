"""`fedpath-server model-info`: the card of a real run's checkpoint, verified; a tampered checkpoint refused."""

import json
import shutil

from server.app import initial_model
from server.cli import main
from server.run_folder import RunFolder
from server.run_recorder import RunRecorder
from tests.conftest import disclosed_site, record_round

SERVER_YAML = """\
name: card consortium
classes: [adenoma, adenocarcinoma]
positive_class: adenocarcinoma
federation: {rounds: 2, spare_rounds: 1}
model: {projection: 8, hidden: 4}
training: {epochs: 3, learning_rate: 0.002, sequence_length: 6}
privacy: {epsilon: 8.0, delta: 1.0e-5}
"""


def _site(epsilon, refused=0):
    return disclosed_site(epsilon, refused, **({"would_spend": 9.0, "budget_epsilon": 8.0} if refused else {}))


def _run(tmp_path):
    (tmp_path / "server.yaml").write_text(SERVER_YAML)
    folder = RunFolder.create(tmp_path / "server.yaml")
    config = folder.config()
    initial = initial_model(config)
    recorder = RunRecorder(folder, config, list(initial))
    record_round(recorder, 1, initial.values(), {"north": _site(1.5), "south": _site(2.5)},
                 {"accuracy": 0.75, "auc": 0.7, "val_patients": 8.0})
    record_round(recorder, 2, [a + 1.0 for a in initial.values()],
                 {"north": _site(3.0), "south": _site(7.9, refused=1)},
                 {"accuracy": 0.75, "auc": 0.9, "val_patients": 8.0})
    return folder


def test_model_info_prints_the_verified_card(tmp_path, capsys):
    folder = _run(tmp_path)
    capsys.readouterr()  # the rounds' own lines
    checkpoint = folder.path / "checkpoints" / "round-0002.npz"
    assert main(["model-info", str(checkpoint)]) == 0
    text = capsys.readouterr().out
    card = json.loads(checkpoint.with_suffix(".json").read_text())
    records = [json.loads(line) for line in (folder.path / "audit.jsonl").read_text().splitlines()]
    mine = [r for r in records if r.get("model_sha256") == card["checkpoint_sha256"]][-1]
    assert card["checkpoint_sha256"] in text and "matches the model card" in text
    assert "core rnn" in text and "projection 8" in text and "rounds        2 of 2" in text
    assert "epochs 3" in text and "learning_rate 0.002" in text and "strategy fedavg" in text
    assert "north" in text and "south" in text and "ε 3" in text and "ε 7.9" in text
    assert "sat out round 2" in text  # south's budget refusal
    assert "auc 0.9" in text
    assert "noise planned for 1 spare round(s)" in text  # the sites' noise covered a redone round too
    assert mine["prev_hash"] == card["audit_prev_hash"]  # the card names the chain its record extends
    assert mine["hash"] in text and card["audit_prev_hash"] in text

    assert main(["model-info", str(checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] is True and info["checkpoint_sha256"] == card["checkpoint_sha256"]
    assert info["round"] == 2 and info["total_rounds"] == 2 and info["sequence_length"] == 6
    assert info["model"]["core"] == "rnn" and info["training"]["epochs"] == 3
    assert info["sites"] == ["north", "south"] and info["sites_last_round"] == ["north"]
    assert info["privacy"]["north"] == {"epsilon": 3.0, "delta": 1e-5}
    assert info["privacy"]["south"]["epsilon"] == 7.9
    assert info["metrics"]["auc"] == 0.9
    assert info["privacy_target"]["spare_rounds"] == 1
    assert info["audit"]["record_hash"] == mine["hash"] and info["audit"]["last_hash"] == records[-1]["hash"]
    assert "trunk_sha256" in info


def test_a_copied_checkpoint_still_shows_its_card(tmp_path, capsys):
    folder = _run(tmp_path)
    capsys.readouterr()  # the rounds' own lines
    elsewhere = tmp_path / "shipped"
    elsewhere.mkdir()
    for suffix in (".npz", ".json"):
        shutil.copy(folder.path / "checkpoints" / f"best{suffix}", elsewhere / f"best{suffix}")
    assert main(["model-info", str(elsewhere / "best.npz"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["audit"]["log"] is None and len(info["audit"]["prev_hash"]) == 64


def test_tampered_checkpoint_is_refused(tmp_path, capsys):
    folder = _run(tmp_path)
    capsys.readouterr()
    checkpoint = folder.path / "checkpoints" / "latest.npz"
    data = bytearray(checkpoint.read_bytes())
    data[-100] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    assert main(["model-info", str(checkpoint)]) == 2
    captured = capsys.readouterr()
    assert "does not match its model card" in captured.err and captured.out == ""
