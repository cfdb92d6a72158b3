"""A curious server against real sites: it may change its own settings or run server code of its own, and
even when the hospitals approved that code (its bundle digest is in their `allowed_bundles`), the sites'
own conditions hold: no secure-aggregation round whose threshold is below a strict majority, no site keys
that are not signed by their own member hospital (the consortium roster), no unmask request naming a site
both active and dropped, no federation id that could name a file. Each refusal is a bare code the server
sees, and a record in every site's egress log. (Every other way of singling a site out, played against the
sites' real checks in one process: tests/test_secure_round.py.)

Real processes on 127.0.0.1: SuperLink behind its proxy, three SuperNodes with their task runners, TLS,
registered keys, SecAgg+; the attacking server code is a copy of the repository with one file changed,
submitted as `flwr run` submits it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import server.superlink
from client.egress_log import EgressLog
from client.site_config import load_site_config
from server.run_control import submit_and_follow
from server.run_folder import RunFolder
from shared.app_bundle import installed_app_dir, installed_digest
from simulations.local_consortium import LocalConsortium
from tests.conftest import copy_hospitals
from tests.consortium_runs import TRAINING

pytestmark = pytest.mark.slow(seconds=450)  # in CI, three processes on two cores

ATTACKS = {
    # every round's plan names a path as the federation id (the sites' ledger file)
    "path-as-federation-id": ("server/app.py", "        federation_id=federation_id, round=round_,",
                              '        federation_id="../x", round=round_,'),
    # at key sharing, present every site's keys under the signature of the lowest node's member hospital
    # (a server that speaks for sites it does not hold the keys of)
    "signature-moved": ("server/secure_aggregation.py",
                        "self._add(message, {str(n): self.keys[n] for n in nodes if n in self.keys})",
                        "self._add(message, {str(n): self.keys[min(nodes)] for n in nodes if n in self.keys})"),
    # at unmasking, ask every site for both shares of one site: its mask seed and its key
    "active-and-dropped": ("server/grid_timeout.py",
                           "        waiting = set(self._grid.push_messages(messages))",
                           "        messages = list(messages)\n"
                           "        for message in messages:\n"
                           "            configs = message.content.config_records.get('secaggplus_configs')\n"
                           "            if configs is not None and configs.get('stage') == 'unmask':\n"
                           "                active = list(configs['active_nids'])\n"
                           "                dead = list(configs['dead_nids'])\n"
                           "                configs['dead_nids'] = dead + active[:1]\n"
                           "        waiting = set(self._grid.push_messages(messages))"),
}


def _attack_bundle(root: Path, name: str) -> Path:
    copy = root / name / "fedpath"
    shutil.copytree(installed_app_dir(), copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "demo", "tests", "docs", "benchmarks", "*.egg-info"))
    path, original, changed = ATTACKS[name]
    text = (copy / path).read_text()
    assert original in text, f"{path} changed: the attack no longer applies"
    (copy / path).write_text(text.replace(original, changed))
    return copy


@pytest.fixture(scope="module")
def consortium(prepared_hospitals, tmp_path_factory):
    """Three hospitals that approved both attacking bundles (so the attacks reach their ClientApps)."""
    root = tmp_path_factory.mktemp("curious")
    bundles = {name: _attack_bundle(root, name) for name in ATTACKS}
    sites = copy_hospitals(prepared_hospitals, root, 3)
    for site in sites:
        document = yaml.safe_load(site.read_text())
        document.setdefault("federation", {})["allowed_bundles"] = [installed_digest(b) for b in bundles.values()]
        site.write_text(yaml.safe_dump(document))
    settings = {"federation": {"rounds": 1, "min_sites": 3, "round_timeout": 120, "wire_log": True},
                "training": TRAINING}
    with LocalConsortium(root / "consortium", sites, server_settings=settings) as started:
        started.start_all()
        started.bundles = bundles
        yield started


def _egress(site_yaml: Path, since: int) -> list[dict]:
    records = EgressLog(load_site_config(site_yaml).state_dir).verify()  # the chain holds, head file included
    return [r for r in records[since:] if r.get("event") == "reply"]


def _run(consortium: LocalConsortium, monkeypatch, bundle: Path | None = None) -> tuple[RunFolder, list[int]]:
    before = [len(EgressLog(load_site_config(s).state_dir).verify()) for s in consortium.site_yamls]
    if bundle is not None:
        monkeypatch.setattr(server.superlink, "APP_DIR", bundle)  # FlowerControl.submit runs `flwr run APP_DIR`
    folder = RunFolder.create(consortium.server_yaml)
    assert submit_and_follow(consortium.control, folder, timeout=300) == 1
    assert folder.status()["state"] == "failed"
    return folder, before


def test_a_threshold_below_a_strict_majority_is_refused_by_every_site(consortium, monkeypatch):
    """The product's own ServerApp, told to unmask with 1 share (the admin's loud override)."""
    document = yaml.safe_load(consortium.server_yaml.read_text())
    document["secure_aggregation"] = {"reconstruction_threshold": 1, "allow_weak_threshold": True}
    consortium.server_yaml.write_text(yaml.safe_dump(document))
    try:
        folder, before = _run(consortium, monkeypatch)
    finally:
        document["secure_aggregation"] = {}
        consortium.server_yaml.write_text(yaml.safe_dump(document))
    message = folder.status()["message"]
    assert "secure aggregation stopped" in message and message.count("(code 9)") == 3
    for site, since in zip(consortium.site_yamls, before, strict=True):
        replies = _egress(site, since)
        assert [(r["stage"], r.get("error_code")) for r in replies] == [("setup", 1009)]  # nothing after it
        assert not (load_site_config(site).state_dir / "ledgers" / f"{folder.federation_id}.json").exists()


def test_a_path_as_federation_id_is_refused_before_any_file_is_touched(consortium, monkeypatch):
    states = [load_site_config(site).state_dir for site in consortium.site_yamls]
    files_before = [sorted(p for p in state.rglob("*") if p.is_file()) for state in states]
    folder, before = _run(consortium, monkeypatch, consortium.bundles["path-as-federation-id"])
    for site, since, state, files in zip(consortium.site_yamls, before, states, files_before, strict=True):
        replies = _egress(site, since)
        refused = [r for r in replies if r.get("error_code")]
        assert [(r["stage"], r["error_code"]) for r in refused] == [("collect_masked_vectors", 1010)]
        new = sorted(set(p for p in state.rglob("*") if p.is_file()) - set(files))
        assert not new, new  # no ledger, no round record: only the logs that were there grew
        assert not (state / "x.json").exists() and not (state.parent / "x.json").exists()


def test_an_unmask_request_naming_a_site_active_and_dropped_is_refused(consortium, monkeypatch):
    folder, before = _run(consortium, monkeypatch, consortium.bundles["active-and-dropped"])
    message = folder.status()["message"]
    assert "secure aggregation stopped" in message and message.count("(code 9)") == 3
    for site, since in zip(consortium.site_yamls, before, strict=True):
        replies = _egress(site, since)
        assert [(r["stage"], r.get("error_code")) for r in replies] == [
            ("setup", None), ("share_keys", None), ("collect_masked_vectors", None), ("survivors", None),
            ("unmask", 1009)]
    assert not (folder.path / "checkpoints" / "round-0001.json").exists()  # no sum was unmasked
    wire = [json.loads(line) for line in (folder.path / "wire.jsonl").read_text().splitlines()]
    refusals = [entry for entry in wire if entry.get("error_code")]
    assert len(refusals) == 3 and all(e["error_code"] == 1009 and not e["error_reason"] for e in refusals)


def test_site_keys_signed_by_another_member_are_refused(consortium, monkeypatch):
    """The server relays every site's keys with one member's signature: the sites' rosters say who
    signed, and a member signs only its own node's keys, so every site refuses before sharing."""
    assert all(load_site_config(site).federation.roster for site in consortium.site_yamls)
    folder, before = _run(consortium, monkeypatch, consortium.bundles["signature-moved"])
    assert "secure aggregation stopped" in folder.status()["message"]
    for site, since in zip(consortium.site_yamls, before, strict=True):
        replies = _egress(site, since)
        assert [(r["stage"], r.get("error_code")) for r in replies] == [("setup", None), ("share_keys", 1009)]
    assert not (folder.path / "checkpoints" / "round-0001.json").exists()
