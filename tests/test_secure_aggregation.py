"""A federated run end to end on a real consortium (TLS, registered sites, SecAgg+, DP): what it
writes and what the admin commands say; the server never receives a site's plain update, the
aggregate equals the plain weighted mean, and every message a site sends holds only arrays of the
model's trainable shapes (or SecAgg+ protocol material) and numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from server.app import initial_model
from server.audit import AuditError, verify
from server.cli import main as server_main
from server.run_control import submit_and_follow
from server.run_folder import RunFolder
from shared.checkpoints import load_checkpoint
from simulations.local_consortium import LocalConsortium
from tests.conftest import copy_hospitals

pytestmark = pytest.mark.slow

TRAIN = "train"
ALLOWED_STRINGS = {"Success", ""}  # Flower's own status text in legacy replies


def _run(consortium: LocalConsortium, secure: bool) -> RunFolder:
    document = yaml.safe_load(consortium.server_yaml.read_text())
    document["secure_aggregation"] = {"enabled": secure}
    consortium.server_yaml.write_text(yaml.safe_dump(document))
    folder = RunFolder.create(consortium.server_yaml)
    assert submit_and_follow(consortium.control, folder, timeout=420) == 0, folder.status()
    return folder


def _wire(folder: RunFolder) -> list[dict]:
    return [json.loads(line) for line in (folder.path / "wire.jsonl").read_text().splitlines()]


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [value["str"]] if set(value) == {"str"} else [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _check_run_outputs(folder: RunFolder, sites: list, status_text: str) -> None:
    assert "round  1 |" in status_text  # printed while following
    assert "3 site(s) online" in status_text and folder.path.name in status_text
    rounds = json.loads((folder.path / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [1]
    assert {n for n, s in rounds[0]["sites"].items() if s["examples"]} == {"site-1", "site-2", "site-3"}
    assert 0 <= rounds[0]["global"]["accuracy"] <= 1
    for name in ("metrics.csv", "curves.png", "checkpoints/round-0001.npz", "checkpoints/best.npz"):
        assert (folder.path / name).is_file(), name
    latest = load_checkpoint(folder.path / "checkpoints" / "latest.npz")
    assert latest.round == 1 and latest.card["sites_this_round"] == ["site-1", "site-2", "site-3"]
    assert all(0 < p["epsilon"] <= 8.0 + 1e-6 for p in latest.card["privacy"].values())
    status = folder.status()
    assert status["state"] == "finished" and status["round"] == 1
    assert verify(folder.audit_log, status["audit_last_hash"]) == 1
    for site in sites:  # one ledger per site for this federation, within its budget
        ledger = json.loads((site.parent / "state" / "ledgers" / f"{folder.federation_id}.json").read_text())
        assert [r["round_id"] for r in ledger["rounds"]] == ["round-1"]
        assert ledger["rounds"][-1]["epsilon_after"] <= 8.0 + 1e-6
    # an edited audit record is detected by the admin command
    folder.audit_log.write_text(folder.audit_log.read_text().replace('"round":1', '"round":7', 1))
    with pytest.raises(AuditError, match="line 1"):
        verify(folder.audit_log)
    assert server_main(["audit", "verify", str(folder.path)]) == 2


def test_federated_run_with_secure_aggregation(prepared_hospitals, tmp_path, capsys):
    sites = copy_hospitals(prepared_hospitals, tmp_path, 3)
    settings = {"federation": {"rounds": 1, "min_sites": 3, "round_timeout": 180, "wire_log": True},
                "training": {"epochs": 1, "batch_size": 2, "learning_rate": 0.003}}
    with LocalConsortium(tmp_path / "consortium", sites, server_settings=settings) as consortium:
        consortium.start_all()
        secure = _run(consortium, secure=True)
        assert server_main(["status", "--config", str(consortium.server_yaml)]) == 0
        status_text = capsys.readouterr().out
        plain = _run(consortium, secure=False)
        trainable = {name: list(array.shape) for name, array in initial_model(consortium.config).items()}

    # same seeds, same data: the masked sum unmasks to the plain weighted mean (DP noise included)
    masked, clear = (load_checkpoint(f.path / "checkpoints" / "latest.npz").arrays for f in (secure, plain))
    assert max(float(np.abs(masked[k] - clear[k]).max()) for k in clear) <= 1e-4
    assert max(float(np.abs(clear[k] - a).max()) for k, a in initial_model(consortium.config).items()) > 1e-3

    secure_wire, plain_wire = _wire(secure), _wire(plain)
    _check_run_outputs(secure, sites, status_text)
    # without SecAgg+, each site's train reply is its update: float32 arrays of the trainable shapes
    plain_train = [m for m in plain_wire if m["type"] == TRAIN and not m["error"]]
    assert len(plain_train) == 3
    for message in plain_train:
        (record,) = message["arrays"].values()
        assert [a["shape"] for a in record.values()] == list(trainable.values())
        assert {a["dtype"] for a in record.values()} == {"float32"}
    # with SecAgg+, no reply carries an array: the masked vectors travel as protocol bytes, as
    # 64-bit integers (quantised and masked), never as the float32 update
    secure_train = [m for m in secure_wire if m["type"] == TRAIN and not m["error"]]
    assert len(secure_train) == 3 * 4  # four protocol stages per site
    assert all(not any(record for record in m["arrays"].values()) for m in secure_train)
    masked = [v["masked_params"] for m in secure_train for v in m["values"].values() if "masked_params" in v]
    assert len(masked) == 3
    projection_values = trainable["projection.weight"][0] * trainable["projection.weight"][1]
    assert all(any(item["bytes"] >= 8 * projection_values for item in vectors) for vectors in masked)
    # nothing but numbers and Flower's status text in any message, in any stage
    for message in secure_wire + plain_wire:
        strings = set(_strings(message["values"]))
        assert strings <= ALLOWED_STRINGS, (message["type"], strings)
        for name, record in message["values"].items():
            if name.startswith("metrics:") or name.endswith(".metrics"):
                assert record and all(kind in ("int", "float") for kind in record.values()), record
