"""Faults on a real consortium on 127.0.0.1: SuperLink and SuperNodes as processes, TLS with generated
certificates, generated slides read through OpenSlide, Opacus DP at every site.

Each test starts its processes through ``LocalConsortium`` (free ports, pid files) and stops
every one of them, by PID, when it ends; every wait is bounded.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from client.feature_cache import FeatureCache
from client.privacy_ledger import PrivacyBudget, PrivacyLedger
from client.sequence_data import load_split
from client.site_config import load_site_config
from server.audit import verify
from server.cli import main as server_main
from server.run_control import follow_run, submit_and_follow
from server.run_folder import RunFolder
from shared.checkpoints import load_checkpoint
from simulations.local_consortium import LocalConsortium
from tests.conftest import copy_hospitals

pytestmark = pytest.mark.slow

TRAINING = {"epochs": 1, "batch_size": 2, "learning_rate": 0.003}
RUN_TIMEOUT = 420  # seconds; a round takes about 30 s here


def _wait_for_round(folder: RunFolder, round_: int, timeout: float = RUN_TIMEOUT) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = folder.path / "metrics.json"
        try:
            rounds = json.loads(path.read_text()) if path.exists() else []
        except ValueError:
            rounds = []
        if any(entry["round"] >= round_ for entry in rounds) and folder.status().get("round", 0) >= round_:
            return rounds
        if folder.status().get("state") == "failed":
            pytest.fail(f"run failed: {folder.status().get('message')}")
        time.sleep(0.5)
    pytest.fail(f"round {round_} not done within {timeout} s; status {folder.status()}")


def _trained(entry: dict) -> set[str]:
    return {name for name, site in entry["sites"].items() if site.get("examples")}


def _exhaust_budget(site_yaml: Path, federation_id: str, rounds: int) -> None:
    """Give a site a ledger for this federation whose budget earlier rounds already spent."""
    config = load_site_config(site_yaml)
    train, _ = load_split(FeatureCache(config.features.cache_dir), "train")
    batches = math.ceil(len({s.patient for s in train}) / TRAINING["batch_size"])
    ledger = PrivacyLedger(config.state_dir / "ledgers" / f"{federation_id}.json", PrivacyBudget(8.0, 1e-5, "rdp"))
    sigma = ledger.noise_for_plan(1 / batches, batches * TRAINING["epochs"], rounds)
    for earlier in range(rounds):
        ledger.record_round(sigma, 1 / batches, batches * TRAINING["epochs"], f"earlier-{earlier}")


def test_site_killed_during_secure_aggregation_and_rejoins(prepared_hospitals, tmp_path):
    sites = copy_hospitals(prepared_hospitals, tmp_path, 3)
    settings = {"federation": {"rounds": 4, "min_sites": 2, "round_timeout": 40}, "training": TRAINING}
    with LocalConsortium(tmp_path / "consortium", sites, server_settings=settings) as consortium:
        assert consortium.config.secure_aggregation.enabled  # the default
        consortium.start_all()
        folder = RunFolder.create(consortium.server_yaml)
        submit_and_follow(consortium.control, folder, follow=False)
        first = _wait_for_round(folder, 1)[0]
        assert _trained(first) == {"site-1", "site-2", "site-3"}
        consortium.kill_site(1)  # a hospital machine dies in round 2, amid the SecAgg+ stages
        consortium.start_site(1)  # and comes back (same key, same node id)
        run_id = folder.run_info()["flower_runs"][-1]
        assert follow_run(consortium.control, folder, run_id, timeout=RUN_TIMEOUT) == 0

    rounds = json.loads((folder.path / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert _trained(rounds[1]) == {"site-1", "site-3"}  # unmasked without the dead site's update
    # the restarted site is refused while the SuperLink still holds its old session, then trains
    # again (its supervisor retries; the server sees it back within a round or two)
    assert "site-2" in _trained(rounds[2]) | _trained(rounds[3])
    assert _trained(rounds[3]) == {"site-1", "site-2", "site-3"}
    assert verify(folder.audit_log, folder.status()["audit_last_hash"]) == 4


def test_server_killed_and_resumed_with_a_refusing_site(prepared_hospitals, tmp_path):
    sites = copy_hospitals(prepared_hospitals, tmp_path, 3)
    settings = {"federation": {"rounds": 2, "min_sites": 2, "round_timeout": 120}, "training": TRAINING}
    with LocalConsortium(tmp_path / "consortium", sites, server_settings=settings) as consortium:
        consortium.start_all()
        folder = RunFolder.create(consortium.server_yaml)
        _exhaust_budget(sites[2], folder.federation_id, rounds=2)
        submit_and_follow(consortium.control, folder, follow=False)
        first = _wait_for_round(folder, 1)[0]
        assert _trained(first) == {"site-1", "site-2"}  # site-3's ledger refused; the round went on
        refusal = folder.status()["sites"]["site-3"]["refusal"]
        assert refusal["code"] == 1 and "budget" in refusal["reason"]
        assert refusal["would_spend"] > refusal["budget_epsilon"]
        consortium.kill_server()  # SuperLink and ServerApp die during round 2
        consortium.start_server()  # same state database; the SuperNodes reconnect
        assert consortium.resume(folder) == 0
        assert server_main(["status", "--config", str(consortium.server_yaml)]) == 0

    rounds = json.loads((folder.path / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]  # none lost, none twice
    assert all(_trained(r) == {"site-1", "site-2"} for r in rounds)
    records = [json.loads(line) for line in folder.audit_log.read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all("site-3" in r["refusals"] for r in records)
    assert verify(folder.audit_log, folder.status()["audit_last_hash"]) == 2
    assert len(folder.run_info()["flower_runs"]) == 2
    assert load_checkpoint(folder.path / "checkpoints" / "latest.npz").round == 2
    for site in sites[:2]:  # a round retried after the crash spends privacy under its own id
        ledger = json.loads((site.parent / "state" / "ledgers" / f"{folder.federation_id}.json").read_text())
        ids = [r["round_id"] for r in ledger["rounds"]]
        assert len(ids) == len(set(ids)) and ids[0] == "round-1" and ids[-1].startswith("round-2")
