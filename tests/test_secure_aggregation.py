"""A federated run end to end on a real consortium (TLS, registered sites, SecAgg+, DP), read as a curious
server would read it: every reply the ServerApp received (the wire log), what the admin commands say,
what the run writes.

The server receives no per-site array and no per-site number beyond each hospital's `disclose:` list;
the masked sum it unmasks equals the patient-weighted mean of what the sites sent (each site keeps a
copy of its own reply vector); and a site that requires SecAgg+ refuses a plain round.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from client.site_config import load_site_config
from client.site_rounds import read_rounds, sent_reply_path
from server.app import initial_model
from server.audit import AuditError, verify
from server.cli import main as server_main
from server.run_control import submit_and_follow
from server.run_folder import RunFolder
from shared.checkpoints import load_checkpoint
from shared.round_sums import CountLayout, decode_sum
from simulations.local_consortium import LocalConsortium
from tests.conftest import copy_hospitals

pytestmark = pytest.mark.slow(seconds=400)  # in CI, three processes on two cores

TRAIN = "train"
ALLOWED_STRINGS = {"Success", ""}  # Flower's own status text in legacy replies
DISCLOSE = {"site-1": ["epsilon", "refused"], "site-2": ["epsilon", "refused"], "site-3": []}


def _wire(folder: RunFolder) -> list[dict]:
    return [json.loads(line) for line in (folder.path / "wire.jsonl").read_text().splitlines()]


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [value["str"]] if set(value) == {"str"} else [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _configure_sites(sites, plain_allowed: bool) -> None:
    for site in sites:
        document = yaml.safe_load(site.read_text())
        document["disclose"] = DISCLOSE[document["name"]]
        document.setdefault("federation", {}).update(keep_sent_replies=True,
                                                     require_secure_aggregation=not plain_allowed)
        site.write_text(yaml.safe_dump(document))


def _run(consortium: LocalConsortium, secure: bool) -> tuple[int, RunFolder]:
    document = yaml.safe_load(consortium.server_yaml.read_text())
    document["secure_aggregation"] = {"enabled": secure, "max_weight": 50}
    consortium.server_yaml.write_text(yaml.safe_dump(document))
    folder = RunFolder.create(consortium.server_yaml)
    return submit_and_follow(consortium.control, folder, timeout=420), folder


def test_a_curious_server_reads_only_the_masked_sum_and_the_disclosed_numbers(prepared_hospitals, tmp_path, capsys):
    sites = copy_hospitals(prepared_hospitals, tmp_path, 3)
    _configure_sites(sites, plain_allowed=False)
    settings = {"federation": {"rounds": 1, "min_sites": 3, "round_timeout": 180, "wire_log": True},
                "training": {"epochs": 1, "batch_size": 2, "learning_rate": 0.003}}
    with LocalConsortium(tmp_path / "consortium", sites, server_settings=settings) as consortium:
        consortium.start_all()
        code, secure = _run(consortium, secure=True)
        assert code == 0, secure.status()
        assert server_main(["status", "--config", str(consortium.server_yaml)]) == 0
        status_text = capsys.readouterr().out
        # a server that turns SecAgg+ off: every site requires it and refuses the plain round (code 8)
        code, plain = _run(consortium, secure=False)
        assert code == 1 and plain.status()["state"] == "failed"
        config = consortium.config

    # what the run wrote and the admin sees
    assert "round  1 |" in status_text and "3 site(s) online" in status_text
    rounds = json.loads((secure.path / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1]  # the initial model, then round 1 (scored by the last exchange)
    assert {name for name, site in rounds[1]["sites"].items() if site["trained"]} == {"site-1", "site-2", "site-3"}
    assert 0 <= rounds[1]["global"]["accuracy"] <= 1 and rounds[1]["global"]["evaluated"]
    for name in ("metrics.csv", "curves.png", "checkpoints/round-0000.npz", "checkpoints/round-0001.npz",
                 "checkpoints/best.npz"):
        assert (secure.path / name).is_file(), name
    latest = load_checkpoint(secure.path / "checkpoints" / "latest.npz")
    assert latest.round == 1 and latest.card["sites_this_round"] == ["site-1", "site-2", "site-3"]
    assert set(latest.card["privacy"]) == {"site-1", "site-2"}  # site-3 discloses no ε
    assert all(0 < p["epsilon"] <= 8.0 + 1e-6 for p in latest.card["privacy"].values())
    status = secure.status()
    assert status["state"] == "finished" and status["round"] == 1 and status["evaluated_round"] == 1
    assert verify(secure.audit_log, status["audit_last_hash"]) == 2
    secure.audit_log.write_text(secure.audit_log.read_text().replace('"round":1', '"round":7', 1))
    with pytest.raises(AuditError, match="line 2"):
        verify(secure.audit_log)
    assert server_main(["audit", "verify", str(secure.path)]) == 2

    # the masked sum the server unmasked is exactly the sum of what the sites sent
    layout = CountLayout(2, config.federation.evaluation_bins, 1)
    configs = [load_site_config(site) for site in sites]
    for exchange, check in ((1, "update"), (2, "evaluation")):
        sent = [np.load(sent_reply_path(c, secure.federation_id, exchange)) for c in configs]
        total = decode_sum([sum(parts) for parts in zip(*([f[k] for k in f.files] for f in sent), strict=True)],
                         layout, 50)
        if check == "update":
            model = load_checkpoint(secure.path / "checkpoints" / "round-0001.npz").arrays
            initial = initial_model(config)
            difference = max(float(np.abs(model[k] - initial[k] - u).max())
                             for k, u in zip(initial, total.update, strict=True))
            assert difference <= 1e-4
            assert max(float(np.abs(u).max()) for u in total.update) > 1e-3
            assert rounds[1]["global"]["examples"] == pytest.approx(total.patients, abs=1e-3)
        else:  # the final exchange scored model 1: the recorded metrics are those of the summed counts
            expected = total.evaluation.metrics(config.classes, config.positive_class)
            assert rounds[1]["global"]["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-3)
            assert rounds[1]["global"]["val_patients"] == pytest.approx(expected["val_patients"], abs=1e-2)
    for config_ in configs:  # each site kept its own numbers: nothing of this left it
        records = read_rounds(config_, secure.federation_id)
        assert [r["round"] for r in records] == [1, 2] and "train_loss" in records[0] and "val" in records[1]
        ledger = json.loads((config_.state_dir / "ledgers" / f"{secure.federation_id}.json").read_text())
        assert [r["round_id"] for r in ledger["rounds"]] == ["round-1-evaluation", "round-1", "round-2-evaluation"]

    # everything the server received, reply by reply
    trainable = {name: list(array.shape) for name, array in initial_model(config).items()}
    wire = _wire(secure)
    replies = [m for m in wire if m["type"] == TRAIN]
    assert not any(m["error"] for m in replies)
    assert len(replies) == 2 * 3 * 5  # two exchanges (train, then score), five stages (survivors too), three sites
    assert all(not any(record for record in m["arrays"].values()) for m in replies)  # no array, ever
    masked = [v["masked_params"] for m in replies for v in m["values"].values() if "masked_params" in v]
    assert len(masked) == 6
    projection = trainable["projection.weight"][0] * trainable["projection.weight"][1]
    assert all(any(item["bytes"] >= 8 * projection for item in vectors) for vectors in masked)
    names = {node: name for name, node in ((e["name"], e["node"]) for e in _nodes(consortium, secure))}
    for message in replies:
        strings = set(_strings(message["values"]))
        assert strings <= ALLOWED_STRINGS, (message["type"], strings)
        for record_name, record in message["values"].items():
            if record_name.startswith("metrics:"):  # per-site numbers: the disclosed ones, and Flower's weight
                disclosed = set(DISCLOSE[names[message["node"]]])
                assert set(record) - {"num_examples"} <= disclosed, (record_name, record)
                assert all(kind in ("int", "float") for kind in record.values()), record


def _nodes(consortium: LocalConsortium, folder: RunFolder) -> list[dict]:
    registry = json.loads((consortium.root / "server" / "state" / "sites.json").read_text())["sites"]
    return [{"name": name, "node": entry["node_id"]} for name, entry in registry.items()]
