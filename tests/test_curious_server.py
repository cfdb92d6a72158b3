"""A curious server against real sites, on one consortium (starting one costs about a minute here).

What it receives from an honest run (the wire log, every reply the ServerApp got): no per-site array and
no per-site number beyond each hospital's `disclose:` list; the masked sum it unmasks equals the
patient-weighted mean of what the sites sent (each site keeps a copy of its own reply vector); a site
that requires SecAgg+ refuses a plain round.

What it may try: change its own settings or run server code of its own, and even when the hospitals
approved that code (its bundle digest is in their `allowed_bundles`), the sites' own conditions hold: no
secure-aggregation round whose threshold is below a strict majority, no site keys that are not signed by
their own member hospital (the consortium roster), no unmask request naming a site both active and
dropped, no federation id that could name a file, no "sum" in which only one site trained (the others
made to sit out, or shown a plan of their own). Each refusal is a bare code the server sees, and a
record in every site's egress log. (Every other way of singling a site out, played against the sites'
real checks in one process: tests/test_secure_round.py.)

Real processes on 127.0.0.1: SuperLink behind its proxy, three SuperNodes with their task runners, TLS,
registered keys, SecAgg+, DP; the attacking server code is a copy of the repository with one file
changed, submitted as `flwr run` submits it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import server.superlink
from client.egress_log import EgressLog
from client.site_config import load_site_config
from client.site_rounds import read_rounds, sent_reply_path
from server.app import initial_model
from server.audit import AuditError, verify
from server.cli import main as server_main
from server.run_control import submit_and_follow
from server.run_folder import RunFolder
from shared.app_bundle import installed_app_dir, installed_digest
from shared.checkpoints import load_checkpoint
from shared.round_sums import CountLayout, decode_sum
from simulations.local_consortium import LocalConsortium
from tests.conftest import copy_hospitals
from tests.consortium_runs import TRAINING

pytestmark = pytest.mark.slow(seconds=620)  # in CI, three processes on two cores

TRAIN = "train"
ALLOWED_STRINGS = {"Success", ""}  # Flower's own status text in legacy replies
DISCLOSE = {"site-1": ["epsilon", "refused"], "site-2": ["epsilon", "refused"], "site-3": []}

_SAMPLED = "        return [(proxy, FitIns(ins.parameters, {**ins.config, **plan})) for proxy, ins in sampled]"
ATTACKS = {
    # every round's plan names a path as the federation id (the sites' ledger file)
    "path-as-federation-id": ("server/app.py", "        federation_id=federation_id, round=round_,",
                              '        federation_id="../x", round=round_,'),
    # at key sharing, present every site's keys under the signature of the lowest node's member hospital
    # (a server that speaks for sites it does not hold the keys of)
    "signature-moved": ("server/secure_aggregation.py",
                        "self._add(message, {**{str(n): self.keys[n] for n in nodes if n in self.keys},",
                        "self._add(message, {**{str(n): self.keys[min(nodes)] for n in nodes if n in self.keys},"),
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
    # at setup, tell every site but the lowest node's a maximum weight of 1e12: Flower's mod scales their
    # updates to zero before masking, and the sum would be that one site's update (Flower's workflow gives
    # every site the same setup record: the attack gives the others a copy of their own)
    "others-weightless": ("server/grid_timeout.py", "        waiting = set(self._grid.push_messages(messages))", """\
        from flwr.app import ConfigRecord, RecordDict
        nodes = [message.metadata.dst_node_id for message in messages]
        for message in messages:
            configs = message.content.config_records.get('secaggplus_configs')
            if configs is not None and configs.get('stage') == 'setup' and message.metadata.dst_node_id != min(nodes):
                weightless = ConfigRecord({**dict(configs.items()), 'max_weight': 1e12})
                message.content = RecordDict({'secaggplus_configs': weightless})
        waiting = set(self._grid.push_messages(messages))"""),
    # the site of the highest node id is asked for replayable noise, which a deployed site refuses (code 15):
    # a round trained by two sites (by one, were it done to all but one)
    "one-sits-out": ("server/federation_strategy.py", _SAMPLED, _SAMPLED.replace("        return", """\
        import json
        (key, text), = plan.items()
        odd = {key: json.dumps({**json.loads(text), "reproducible_noise": True})}
        last = max(proxy.node_id for proxy, _ in sampled)
        return""").replace("**plan}", "**(odd if proxy.node_id == last else plan)}")),
    # every site but the lowest node's trains at a millionth of the learning rate: their updates vanish in the
    # sum, which would then be that one site's update
    "others-tiny-steps": ("server/federation_strategy.py", _SAMPLED, _SAMPLED.replace("        return", """\
        import json
        (key, text), = plan.items()
        document = json.loads(text)
        odd = {key: json.dumps({**document, "learning_rate": document["learning_rate"] / 1e6})}
        first = min(proxy.node_id for proxy, _ in sampled)
        return""").replace("**plan}", "**(plan if proxy.node_id == first else odd)}")),
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
    """Three hospitals that require SecAgg+, keep a copy of what they send, disclose what DISCLOSE says
    and approved the attacking bundles (so the attacks reach their ClientApps)."""
    root = tmp_path_factory.mktemp("curious")
    bundles = {name: _attack_bundle(root, name) for name in ATTACKS}
    sites = copy_hospitals(prepared_hospitals, root, 3)
    for site in sites:
        document = yaml.safe_load(site.read_text())
        document["disclose"] = DISCLOSE[document["name"]]
        document.setdefault("federation", {}).update(
            allowed_bundles=[installed_digest(b) for b in bundles.values()], keep_sent_replies=True,
            require_secure_aggregation=True)
        site.write_text(yaml.safe_dump(document))
    settings = {"federation": {"rounds": 1, "min_sites": 3, "round_timeout": 180, "wire_log": True},
                "training": TRAINING}
    with LocalConsortium(root / "consortium", sites, server_settings=settings) as started:
        started.start_all()
        started.bundles = bundles
        yield started


def _wire(folder: RunFolder) -> list[dict]:
    return [json.loads(line) for line in (folder.path / "wire.jsonl").read_text().splitlines()]


def _strings(value) -> list[str]:
    if isinstance(value, dict):
        return [value["str"]] if set(value) == {"str"} else [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _honest_run(consortium: LocalConsortium, secure: bool) -> tuple[int, RunFolder]:
    document = yaml.safe_load(consortium.server_yaml.read_text())
    document["secure_aggregation"] = {"enabled": secure, "max_weight": 50}
    consortium.server_yaml.write_text(yaml.safe_dump(document))
    try:
        folder = RunFolder.create(consortium.server_yaml)
        return submit_and_follow(consortium.control, folder, timeout=420), folder
    finally:
        document["secure_aggregation"] = {}
        consortium.server_yaml.write_text(yaml.safe_dump(document))


def test_a_curious_server_reads_only_the_masked_sum_and_the_disclosed_numbers(consortium, capsys):
    sites = consortium.site_yamls
    code, secure = _honest_run(consortium, secure=True)
    assert code == 0, secure.status()
    assert server_main(["status", "--config", str(consortium.server_yaml)]) == 0
    status_text = capsys.readouterr().out  # the run's round lines, then `status`
    # a server that turns SecAgg+ off: every site requires it and refuses the plain round (code 8)
    code, plain = _honest_run(consortium, secure=False)
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
    server_log = _server_log(secure)  # the server's own check of the survivors' signatures agrees with the sites'
    assert "[ROUND 1]" in server_log and "no valid signature" not in server_log and "different plans" not in server_log
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
                         layout, 50, [a.shape for a in initial_model(config).values()] if check == "update" else [])
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
    values = sum(int(np.prod(shape)) for shape in trainable.values())
    # per reply Flower's masked weight and one masked vector (64-bit integers): the model travels packed
    assert all(len(vectors) == 2 and vectors[0]["bytes"] < 8 * 100 for vectors in masked)
    sizes = sorted(vectors[1]["bytes"] for vectors in masked)
    assert all(size >= 8 * values for size in sizes[3:])  # the training exchange: the model's values
    assert all(size < 8 * 100 for size in sizes[:3])  # the scoring exchange: only the counts
    names = {node: name for name, node in ((e["name"], e["node"]) for e in _nodes(consortium, secure))}
    for message in replies:
        strings = set(_strings(message["values"]))
        assert strings <= ALLOWED_STRINGS, (message["type"], strings)
        for record_name, record in message["values"].items():
            if record_name.startswith("metrics:"):  # per-site numbers: the disclosed ones, and Flower's weight
                disclosed = set(DISCLOSE[names[message["node"]]])
                assert set(record) - {"num_examples"} <= disclosed, (record_name, record)
                assert all(kind in ("int", "float") for kind in record.values()), record


def _server_log(folder: RunFolder) -> str:
    return "".join(path.read_text() for path in folder.path.glob("flower-run-*.log"))


def _nodes(consortium: LocalConsortium, folder: RunFolder) -> list[dict]:
    registry = json.loads((consortium.root / "server" / "state" / "sites.json").read_text())["sites"]
    return [{"name": name, "node": entry["node_id"]} for name, entry in registry.items()]


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
        # no ledger, no round record: only the logs that were there grew, and the note that the site took the
        # round's collect stage (named by Flower's run number, before the plan is read: client/secure_round.py)
        note = Path("secagg") / f"run-{folder.run_info()['flower_runs'][-1]}.collects"
        assert [p.relative_to(state) for p in new] == [note], new
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


def _site_of_node(consortium: LocalConsortium, folder: RunFolder) -> dict[int, Path]:
    by_name = {load_site_config(site).name: site for site in consortium.site_yamls}
    return {entry["node"]: by_name[entry["name"]] for entry in _nodes(consortium, folder)}


def test_a_site_that_sits_out_is_not_summed_and_two_trained_sites_are_too_few(consortium, monkeypatch):
    """One site is asked for replayable noise and sits the round out. It answers with its code (1015), not a
    masked vector of zeros that would count it among the summed sites: two sites trained, fewer than their
    min_round_sites (3), and they reveal nothing. (The same holds when a site sits out on its own, its
    budget spent; a server doing this to all but one site would be refused by the threshold already.)"""
    folder, before = _run(consortium, monkeypatch, consortium.bundles["one-sits-out"])
    sites = _site_of_node(consortium, folder)
    out = max(sites)
    # its reason leaves only if it discloses `refused` (site-3 does not: code 16, "it does not disclose why")
    code = 15 if "refused" in DISCLOSE[load_site_config(sites[out]).name] else 16
    message = folder.status()["message"]
    assert "secure aggregation stopped" in message and f"(code {code})" in message and message.count("(code 9)") == 3
    assert "A site that sits a SecAgg+ round out is not in the sum" in message
    for node, site in sites.items():
        since = before[consortium.site_yamls.index(site)]
        stages = [(r["stage"], r.get("error_code")) for r in _egress(site, since)]
        if node == out:
            assert stages == [("setup", None), ("share_keys", None), ("collect_masked_vectors", 1000 + code)]
        else:
            assert stages == [("setup", None), ("share_keys", None), ("collect_masked_vectors", None),
                              ("survivors", 1009), ("unmask", 1009)]
    assert not (folder.path / "checkpoints" / "round-0001.json").exists()


def test_sites_shown_another_plan_do_not_unmask_the_one_that_trained_on_the_real_one(consortium, monkeypatch):
    """All three train and send masked vectors, but two were told a millionth of the learning rate: the
    sum would be the third site's update. Each survivor signed the survivors with a digest of the plan
    and model it trained on; no site finds every survivor's signature on its own, and none reveals a
    share."""
    folder, before = _run(consortium, monkeypatch, consortium.bundles["others-tiny-steps"])
    assert "the sites were sent different plans or models" in _server_log(folder)  # the server's log says why
    message = folder.status()["message"]
    assert "secure aggregation stopped" in message and message.count("(code 9)") == 3
    for site, since in zip(consortium.site_yamls, before, strict=True):
        assert [(r["stage"], r.get("error_code")) for r in _egress(site, since)] == [
            ("setup", None), ("share_keys", None), ("collect_masked_vectors", None), ("survivors", None),
            ("unmask", 1009)]
    assert not (folder.path / "checkpoints" / "round-0001.json").exists()


def test_sites_given_other_secagg_settings_send_no_masked_vector(consortium, monkeypatch):
    """Two sites are told a maximum weight of 1e12 at setup (their updates would be quantised to nothing):
    the settings are part of the view every site signs, so no site finds its partners' signatures on its
    own view, and none sends its masked vector."""
    folder, before = _run(consortium, monkeypatch, consortium.bundles["others-weightless"])
    message = folder.status()["message"]
    assert "secure aggregation stopped" in message and message.count("(code 9)") == 3
    for site, since in zip(consortium.site_yamls, before, strict=True):
        assert [(r["stage"], r.get("error_code")) for r in _egress(site, since)] == [
            ("setup", None), ("share_keys", None), ("collect_masked_vectors", 1009)]
    assert not (folder.path / "checkpoints" / "round-0001.json").exists()
