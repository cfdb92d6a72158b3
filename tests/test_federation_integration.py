"""Faults on a real consortium on 127.0.0.1: SuperLink and SuperNodes as processes, TLS with generated
certificates, generated slides read through OpenSlide, Opacus DP at every site.

Each test starts its processes through ``LocalConsortium`` (free ports, pid files) and stops
every one of them, by PID, when it ends; every wait is bounded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from client.feature_cache import FeatureCache
from client.private_training import PrivateRound
from client.sequence_data import PatientSequences, load_split
from client.site_config import load_site_config
from server.audit import verify
from server.cli import main as server_main
from server.run_control import follow_run, submit_and_follow
from server.run_folder import RunFolder
from shared.checkpoints import load_checkpoint
from shared.model import SequenceHead
from shared.run_config import PrivacyConfig, TrainingConfig
from simulations.local_consortium import LocalConsortium
from tests.conftest import copy_hospitals

pytestmark = pytest.mark.slow

TRAINING = {"epochs": 1, "batch_size": 2, "learning_rate": 0.003}
RUN_TIMEOUT = 420  # seconds; a round takes about 30 s here


def _wait_for_model(folder: RunFolder, round_: int, timeout: float = RUN_TIMEOUT) -> dict:
    """Wait until round ``round_``'s model is saved (its metrics come with the next exchange); its card."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if folder.status().get("round", 0) >= round_:
            return json.loads((folder.path / "checkpoints" / f"round-{round_:04d}.json").read_text())
        if folder.status().get("state") == "failed":
            pytest.fail(f"run failed: {folder.status().get('message')}")
        time.sleep(0.5)
    pytest.fail(f"round {round_} not done within {timeout} s; status {folder.status()}")


def _trained(rounds: list[dict], round_: int) -> set[str]:
    [entry] = [e for e in rounds if e["round"] == round_]
    return {name for name, site in entry["sites"].items() if site.get("trained")}


def _accept_two_site_rounds(sites: list[Path]) -> None:
    """These hospitals accept SecAgg+ rounds of two sites (a dead site leaves two)."""
    for site in sites:
        document = yaml.safe_load(site.read_text())
        document.setdefault("federation", {})["min_round_sites"] = 2
        site.write_text(yaml.safe_dump(document))


def _exhaust_budget(site_yaml: Path, federation_id: str, rounds: int) -> None:
    """Give a site a ledger for this federation, planned as the site plans it, whose budget earlier
    rounds already spent."""
    config = load_site_config(site_yaml)
    train, _ = load_split(FeatureCache(config.features.cache_dir), "train")
    privacy = PrivacyConfig(epsilon=8.0, delta=1e-5, planned_rounds=rounds)
    session = PrivateRound(SequenceHead(2, "rnn", projection=8, hidden=4), PatientSequences(train, 4),
                           TrainingConfig(**TRAINING), privacy, config.state_dir / "ledgers" / f"{federation_id}.json",
                           evaluations=rounds + 1, evaluation_share=0.25)
    for earlier in range(rounds):
        session.ledger.record_segment(session.plan.training_segment, f"earlier-{earlier}")
    for earlier in range(rounds + 1):
        session.ledger.record_segment(session.plan.evaluation_segment, f"earlier-{earlier}-evaluation",
                                      kind="evaluation")


def test_site_killed_during_secure_aggregation_and_rejoins(prepared_hospitals, tmp_path):
    sites = copy_hospitals(prepared_hospitals, tmp_path, 3)
    _accept_two_site_rounds(sites)
    # six rounds: a restarted site is refused while the SuperLink still holds its old session (about a
    # minute) and its supervisor backs off; rounds here take about 20 s
    settings = {"federation": {"rounds": 6, "min_sites": 2, "round_timeout": 60}, "training": TRAINING}
    with LocalConsortium(tmp_path / "consortium", sites, server_settings=settings) as consortium:
        assert consortium.config.secure_aggregation.enabled  # the default
        consortium.start_all()
        folder = RunFolder.create(consortium.server_yaml)
        submit_and_follow(consortium.control, folder, follow=False)
        assert _wait_for_model(folder, 1)["sites_this_round"] == ["site-1", "site-2", "site-3"]
        consortium.kill_site(1)  # a hospital machine dies in round 2, amid the SecAgg+ stages
        consortium.start_site(1)  # and comes back (same key, same node id)
        run_id = folder.run_info()["flower_runs"][-1]
        assert follow_run(consortium.control, folder, run_id, timeout=RUN_TIMEOUT) == 0

    rounds = json.loads((folder.path / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4, 5, 6]
    assert _trained(rounds, 2) == {"site-1", "site-3"}  # unmasked without the dead site's update
    # the restarted site is refused while the SuperLink still holds its old session, then trains
    # again (its supervisor retries; the server sees it back within a few rounds)
    assert _trained(rounds, 6) == {"site-1", "site-2", "site-3"}
    assert verify(folder.audit_log, folder.status()["audit_last_hash"]) == 7


def test_server_killed_and_resumed_with_a_refusing_site(prepared_hospitals, tmp_path):
    sites = copy_hospitals(prepared_hospitals, tmp_path, 3)
    settings = {"federation": {"rounds": 2, "min_sites": 2, "round_timeout": 120}, "training": TRAINING}
    with LocalConsortium(tmp_path / "consortium", sites, server_settings=settings) as consortium:
        document = yaml.safe_load(sites[2].read_text())  # this hospital tells the admin why it sits out
        document["disclose"] = ["epsilon", "refused", "would_spend", "budget_epsilon"]
        sites[2].write_text(yaml.safe_dump(document))  # before start: its task runner's egress policy reads it
        consortium.start_all()
        folder = RunFolder.create(consortium.server_yaml)
        _exhaust_budget(sites[2], folder.federation_id, rounds=2)
        submit_and_follow(consortium.control, folder, follow=False)
        assert _wait_for_model(folder, 1)["sites_this_round"] == ["site-1", "site-2"]  # site-3's ledger refused
        refusal = folder.status()["sites"]["site-3"]["refusal"]
        assert refusal["code"] == 1 and "budget" in refusal["reason"]
        assert refusal["would_spend"] > refusal["budget_epsilon"]
        consortium.kill_server()  # SuperLink and ServerApp die during round 2
        consortium.start_server()  # same state database; the SuperNodes reconnect
        assert consortium.resume(folder) == 0
        assert server_main(["status", "--config", str(consortium.server_yaml)]) == 0

    rounds = json.loads((folder.path / "metrics.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2]  # none lost, none twice
    assert all(_trained(rounds, r) == {"site-1", "site-2"} for r in (1, 2))
    records = [json.loads(line) for line in folder.audit_log.read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all("site-3" in r["refusals"] for r in records[1:])
    assert verify(folder.audit_log, folder.status()["audit_last_hash"]) == 3
    assert len(folder.run_info()["flower_runs"]) == 2
    assert load_checkpoint(folder.path / "checkpoints" / "latest.npz").round == 2
    for site in sites[:2]:  # a round retried after the crash spends privacy under its own id
        ledger = json.loads((site.parent / "state" / "ledgers" / f"{folder.federation_id}.json").read_text())
        training = [r["round_id"] for r in ledger["rounds"] if r["kind"] == "training"]
        assert len(training) == len(set(training)) and training[0] == "round-1" and training[-1].startswith("round-2")
