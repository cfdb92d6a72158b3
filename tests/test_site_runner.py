"""The site's task runner on a real consortium (SuperLink behind its proxy, three SuperNodes with their
runners, TLS, registered keys, SecAgg+, DP), every process started by `fedpath-site start` /
`fedpath-server start` on 127.0.0.1 with free ports and stopped by PID at the end:

- a federated run completes with the runners, every site's egress log verifies and lists exactly
  the replies the server received from it; an exception inside one site's ClientApp reaches the
  server as an error code without text, and that site's runner goes on serving;
- a bundle whose client code differs from the sites' installed version is refused at every site:
  nothing trains, no ledger is written, no cache is read, the run does not complete;
- an outsider holding just the consortium CA certificate (every hospital has it) talks to the
  sites' port, which is the proxy: `flwr ls`, `flwr supernode ls`, `flwr supernode register`,
  `flwr run`, raw requests to the Control and Runtime APIs, /docs and /openapi.json are all refused
  at the proxy, the SuperLink is never contacted and its state does not change; meanwhile the admin
  commands work on the loopback port and the registered sites train a SecAgg+ round through the
  proxy (issue 13; the rest of the control plane: tests/test_control_plane.py).

The three share one consortium (module fixture): starting one costs about a minute here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from flwr.proto.fleet_pb2 import PullMessagesRequest  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=no-name-in-module
from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module

import server.superlink
from client.egress_log import REFUSED, SENT, EgressLog
from client.ledger_guard import BASELINE_KEY
from client.site_config import load_site_config
from server.cli import main as server_main
from server.run_control import follow_run, submit_and_follow
from server.run_folder import RunFolder
from server.superlink import APP_DIR, CONNECTION, StatePaths
from shared.app_bundle import installed_app_dir, installed_digest, stage_app
from shared.checkpoints import load_checkpoint
from shared.processes import descendants, executable, flower_env, recorded_pid, signal_each
from shared.site_keys import keygen
from simulations.local_consortium import LocalConsortium
from tests.conftest import copy_hospitals
from tests.consortium_runs import TRAINING, accept_two_site_rounds, proxy_access_log, raw_request

pytestmark = pytest.mark.slow(seconds=450)  # in CI, three processes on two cores

WAIT_S = 90


def _runner_pid(site_yaml: Path) -> int:
    """The pid of the site's task runner once it has written its start record (bounded wait)."""
    state = load_site_config(site_yaml).state_dir
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        supervisor = recorded_pid(state / "supernode.pid")
        runners = [pid for pid in (descendants(supervisor) if supervisor else [])
                   if b"client.task_runner" in _cmdline(pid)]
        starts = [r for r in _records(state) if r.get("event") == "start"]
        if runners and starts and starts[-1]["pid"] in runners:
            return starts[-1]["pid"]
        time.sleep(0.5)
    pytest.fail(f"the task runner of {site_yaml.parent.name} did not start within {WAIT_S} s; log:\n"
                f"{(state / 'supernode.log').read_text()[-3000:]}")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _records(state: Path) -> list[dict]:
    path = state / "egress.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _replies(site_yaml: Path) -> list[dict]:
    """The site's egress log, verified (chain and head file), reply records only."""
    return [r for r in EgressLog(load_site_config(site_yaml).state_dir).verify() if r["event"] == "reply"]


def _wire_by_node(folder: RunFolder) -> dict[int, list[dict]]:
    by_node: dict[int, list[dict]] = {}
    for line in (folder.path / "wire.jsonl").read_text().splitlines():
        entry = json.loads(line)
        by_node.setdefault(entry["node"], []).append(entry)
    return by_node


@pytest.fixture(scope="module")
def consortium(prepared_hospitals, tmp_path_factory):
    """One consortium for the three tests (starting one takes about a minute here): min_sites 2 (and the
    sites' min_round_sites 2) let a round finish without a failing site; the attack needs every site
    to refuse anyway."""
    root = tmp_path_factory.mktemp("runner")
    sites = copy_hospitals(prepared_hospitals, root, 3)
    accept_two_site_rounds(sites)
    settings = {"federation": {"rounds": 1, "min_sites": 2, "round_timeout": 120, "wire_log": True},
                "training": TRAINING}
    with LocalConsortium(root / "consortium", sites, server_settings=settings) as started:
        started.start_all()
        for site in sites:
            _runner_pid(site)
        yield started


def test_runner_serves_a_secure_run_and_survives_an_exception(consortium):
    sites = consortium.site_yamls
    pids = [_runner_pid(site) for site in sites]
    before = {site: len(_replies(site)) for site in sites}
    # three sites on one machine: each was given its share of the cores, and its runner's torch uses it (the
    # runner's own report of torch.get_num_threads(), not the setting written for it)
    share = max(1, (os.cpu_count() or 1) // 3)
    for site in sites:
        assert f", {share} torch thread(s);" in (load_site_config(site).state_dir / "supernode.log").read_text()
    # Site 3's ClientApp reads site.yaml for every message; its runner read it at start. A broken
    # file makes the ClientApp raise in every stage that trains or evaluates.
    broken, quiet = sites[2], sites[1]
    original, quiet_original = broken.read_text(), quiet.read_text()
    broken.write_text(original + "\nfederation: [not yaml\n")
    # Site 2 keeps its evaluation counts: zeros in its masked vector would leave site 1's counts as the "sum"
    quiet_document = yaml.safe_load(quiet_original)
    quiet_document.setdefault("privacy", {})["release_evaluation"] = False
    quiet.write_text(yaml.safe_dump(quiet_document))
    try:
        folder = RunFolder.create(consortium.server_yaml)
        assert submit_and_follow(consortium.control, folder, timeout=300) == 0, folder.status()
    finally:
        broken.write_text(original)  # close() reads every site.yaml to find the pid files
        quiet.write_text(quiet_original)
    # no runner was restarted: the exception did not end site 3's
    assert [_runner_pid(site) for site in sites] == pids
    rounds = json.loads((folder.path / "metrics.json").read_text())
    assert {name for name, site in rounds[1]["sites"].items() if site["trained"]} == {"site-1", "site-2"}
    # so no site released counts: the update was summed as ever, the model is recorded as not scored
    assert [r["global"]["evaluated"] for r in rounds] == [False, False]
    server_log = "".join(path.read_text() for path in folder.path.glob("flower-run-*.log"))
    assert "offer no evaluation counts" in server_log
    for site in sites[:2]:  # trained, released nothing, spent nothing on evaluation
        config = load_site_config(site)
        ledger = json.loads((config.state_dir / "ledgers" / f"{folder.federation_id}.json").read_text())
        assert [r["round_id"] for r in ledger["rounds"]] == ["round-1"]
    card = load_checkpoint(folder.path / "checkpoints" / "round-0001.npz").card
    wire = _wire_by_node(folder)
    assert not any(entry.get("error_reason") for entries in wire.values() for entry in entries)

    stages = ["setup", "share_keys", "collect_masked_vectors", "survivors", "unmask"]
    for index, site in enumerate(sites):
        replies = _replies(site)[before[site]:]
        (node,) = {r["node"] for r in replies}
        received = wire[node]
        # the egress log lists exactly what the server received from this site, in order
        assert [(r["type"], r.get("error_code")) for r in replies] == \
               [(w["type"], w.get("error_code")) for w in received]
        assert {r["bundle"] for r in replies} == {installed_digest()}
        masked = [r for r in replies if r["stage"] == "collect_masked_vectors" and r["outcome"] == SENT]
        wired = [v["masked_params"] for w in received for v in w["values"].values() if "masked_params" in v]
        assert [m["content"]["configs"]["secaggplus_configs"]["masked_params"]["bytes"] for m in masked] == \
               [sum(item["bytes"] for item in vector) for vector in wired]
        if index < 2:  # two exchanges (train, then score the final model), five SecAgg+ stages each
            assert [(r["type"], r["stage"], r["outcome"]) for r in replies] == \
                [("train", stage, SENT) for stage in stages] * 2
            # build_runner wrote the guard's baseline into the log's first start record (no ledger there yet)
            [first_start, *_] = [r for r in EgressLog(load_site_config(site).state_dir).verify()
                                 if r["event"] == "start"]
            assert first_start[BASELINE_KEY] == {}
            # the one reply whose message the ledger recorded a release for names its federation (ledger guard)
            assert [r.get("spent") for r in replies] == [None, None, folder.federation_id, None, None] + [None] * 5
            update = masked[0]  # the disclosed numbers are in the site's own record, as values
            assert update["content"]["arrays"] == {"fitres.parameters": {}}
            assert set(update["content"]["configs"]["fitres.metrics"]) == {"epsilon", "refused"}
            assert update["content"]["configs"]["fitres.metrics"]["epsilon"] == \
                pytest.approx(card["privacy"][f"site-{index + 1}"]["epsilon"])
            assert update["content"]["metrics"]["fitres.num_examples"]["num_examples"] == 1000  # the same for all
            offers = [r["content"]["configs"]["fedpath-secagg"]["evaluation_offer"] for r in replies
                      if r["stage"] == "setup"]
            assert offers == [index == 0] * 2  # what each site told the server at setup, in its own log
        else:  # the broken site.yaml fails the first stage of each exchange: a code, no text, and it is out
            assert [(r["stage"], r["outcome"], r.get("error_code")) for r in replies] == \
                [("setup", SENT, 1013)] * 2
            log = (load_site_config(site).state_dir / "supernode.log").read_text()
            assert "YAML syntax error" in log and "could not handle a train message" in log
            assert "task runner exited" not in log


def test_a_bundle_with_other_client_code_is_refused_everywhere(consortium, tmp_path, monkeypatch):
    sites = consortium.site_yamls
    # the consortium admin's copy of the repository, one client file changed
    attack = tmp_path / "fedpath"
    shutil.copytree(installed_app_dir(), attack, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "demo", "tests", "docs", "benchmarks", "*.egg-info"))
    with open(attack / "client" / "federated_round.py", "a") as handle:
        handle.write("\nprint('an unreviewed change to what the sites run')\n")
    attack_digest = installed_digest(attack)
    assert attack_digest != installed_digest()

    configs = [load_site_config(site) for site in sites]
    before = {site: len(_replies(site)) for site in sites}
    logs = {site: len((config.state_dir / "supernode.log").read_text())
            for site, config in zip(sites, configs, strict=True)}
    ledgers = _ledgers(configs)
    caches = list(dict.fromkeys(config.features.cache_dir for config in configs))
    # The caches moved away for the attack's run: any read of one (the warm worker's memory looks at the file
    # first) fails the stage with code 13 instead of the bundle refusal 1012, whatever the file system records.
    away: list[tuple[Path, Path]] = []
    try:
        for cache in caches:
            away.append((cache, cache.rename(cache.with_name(cache.name + ".away"))))
        monkeypatch.setattr(server.superlink, "APP_DIR", attack)  # FlowerControl.submit runs `flwr run APP_DIR`
        folder = RunFolder.create(consortium.server_yaml)
        assert submit_and_follow(consortium.control, folder, timeout=240) != 0
        assert folder.status().get("state") != "finished"
    finally:
        for cache, moved in away:
            moved.rename(cache)

    for site, config in zip(sites, configs, strict=True):
        replies = _replies(site)[before[site]:]
        assert replies and all(r["outcome"] == REFUSED and r["error_code"] == 1012 for r in replies), replies
        assert {r["bundle"] for r in replies} == {attack_digest}
        assert not (config.state_dir / "ledgers" / f"{folder.federation_id}.json").exists()
        log = (config.state_dir / "supernode.log").read_text()[logs[site]:]
        assert "refused (code 1012)" in log and "running the ClientApp" not in log
    assert _ledgers(configs) == ledgers  # no ledger written or changed: nothing trained, no cache read (1012 above)
    wire = [entry for entries in _wire_by_node(folder).values() for entry in entries]
    assert wire and all(entry["error_code"] == 1012 and not entry["error_reason"] for entry in wire)


REFUSED_AT_PROXY = [  # (method, path, status at the proxy): nothing but a Fleet route reaches the SuperLink
    ("POST", "/v1/control/list-runs", 404), ("POST", "/v1/control/list-nodes", 404),
    ("POST", "/v1/control/register-node", 404), ("POST", "/v1/control/start-run", 404),
    ("POST", "/v1/runtime/acquire-task", 404), ("GET", "/docs", 404), ("GET", "/openapi.json", 404),
    ("GET", "/health", 404), ("GET", "/", 404),
    # the SuperLink routes on the decoded path: encoded, dot and doubled segments never reach it
    ("POST", "/v1/fleet/../control/list-runs", 404), ("POST", "/v1/fleet/%2e%2e/control/list-runs", 404),
    ("POST", "/v1/fleet/%2E%2E%2Fcontrol%2Flist-runs", 404), ("POST", "/v1/fleet//../control/list-runs", 404),
    ("POST", "/v1//control/list-runs", 404), ("POST", "/v1/fleet/get-run?x=/v1/control/list-runs", 404),
    ("GET", "/v1/fleet/get-run", 403),  # Fleet routes are POST only
]
FLWR_ROUTES = {"ls": "list-runs", "supernode ls": "list-nodes", "supernode register KEY": "register-node",
               "run APP": "start-run"}  # the outsider's `flwr` commands and the Control API route each calls



def _outsider_flwr(home: Path, *args: str) -> dict:
    """`flwr` as someone with only ca.pem and the sites' address would run it."""
    result = subprocess.run([executable("flwr"), *args, "--format", "json"], capture_output=True, text=True,
                            env=flower_env(home), cwd=home.parent, timeout=120, check=False)
    return json.loads(result.stdout[result.stdout.find("{"):])


def test_outsider_with_the_ca_certificate_is_refused_while_sites_train_through_the_proxy(
        consortium, tmp_path, nginx, capsys):
    """SecAgg+ rounds through the proxy: the sites' replies are masked vectors of several MB."""
    nodes_before = {n["node-id"] for n in consortium.control.nodes()}
    runs_before = {int(r["run-id"]) for r in consortium.control.runs()}
    results = consortium.config.results_dir
    folders_before = set(results.iterdir()) if results.is_dir() else set()
    # the admin submits from the server host (loopback port); the outsider tries while it starts
    assert server_main(["run", "--config", str(consortium.server_yaml), "--no-follow"]) == 0
    (folder,) = [RunFolder.open(p) for p in set(results.iterdir()) - folders_before]
    (run_id,) = folder.run_info()["flower_runs"]

    outsider = tmp_path / "outsider"
    home = outsider / "flwr"
    home.mkdir(parents=True)
    ca = Path(shutil.copy(consortium.config.superlink.certs_dir / "ca.pem", outsider / "ca.pem"))
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                      f'address = "127.0.0.1:{consortium.port}"\nroot-certificates = "{ca}"\n')
    keygen(outsider, "intruder")
    app = stage_app(APP_DIR, outsider / "app")  # the app's own files: `flwr run` on the repository walks its .venv
    for command, route in FLWR_ROUTES.items():
        args = command.replace("KEY", str(outsider / "intruder.pub")).replace("APP", str(app)).split()
        answer = _outsider_flwr(home, *args)
        assert answer["success"] is False, (args, answer)
        assert f"404 Not Found' for url 'https://127.0.0.1:{consortium.port}/v1/control/{route}'" in \
            answer["error-message"], (args, answer)

    for method, path, status in REFUSED_AT_PROXY:
        assert raw_request(consortium.port, method, path, ca) == status, (method, path)
    # the same requests on the loopback port reach the SuperLink: the refusals above are the proxy's
    assert raw_request(consortium.loopback_port, "GET", "/openapi.json", ca) == 200
    assert raw_request(consortium.loopback_port, "POST", "/v1/control/list-runs", ca) == 200
    # a stranger's push is refused by Flower's node authentication, checked by the pull relay before it
    # reads the body (and by the SuperLink behind it), also with a body well above the proxy's 1 MB buffer
    # (it streams, nothing spooled to disk); the relay reads a refused body into nothing, so the answer is
    # its 401, not a reset the proxy would report as 502
    big = PushObjectRequest(object_content=os.urandom(5 << 20)).SerializeToString()
    assert raw_request(consortium.port, "POST", "/v1/fleet/push-object", ca, body=big) == 401
    # a body above superlink.max_request_mb (64 MB) is refused from its Content-Length alone
    assert raw_request(consortium.port, "POST", "/v1/fleet/push-object", ca,
                       headers={"Content-Length": str(65 << 20)}) == 413
    # the SuperLink's state did not change: the registered nodes only, the admin's runs only
    assert {n["node-id"] for n in consortium.control.nodes()} == nodes_before
    assert {int(r["run-id"]) for r in consortium.control.runs()} == runs_before | {run_id}

    # meanwhile the registered sites train a real round through the proxy
    assert follow_run(consortium.control, folder, run_id, timeout=300) == 0
    assert folder.status()["state"] == "finished"
    capsys.readouterr()
    assert server_main(["sites", "--config", str(consortium.server_yaml)]) == 0
    table = capsys.readouterr().out
    assert all(re.search(rf"site-{n} +\d+ +online", table) for n in (1, 2, 3)), table
    assert "UNKNOWN" not in table and "MISSING" not in table

    log = proxy_access_log(consortium)
    refused = {(method, path) for method, path, _ in REFUSED_AT_PROXY} | \
        {("POST", f"/v1/control/{route}") for route in FLWR_ROUTES.values()}
    outsider_lines = [e for e in log if (e["method"], e["uri"]) in refused]
    assert {(e["method"], e["uri"]) for e in outsider_lines} == refused
    assert all(e["upstream"] == "-" for e in outsider_lines), outsider_lines  # never passed on
    assert [e["upstream"] for e in log if e["status"] == "413"] == ["-"]
    assert not any(p.is_file() for p in StatePaths(consortium.config).proxy.temp.rglob("*"))

    fleet = [e for e in log if e["upstream"] == f"127.0.0.1:{consortium.loopback_port}"]
    assert all(e["uri"].startswith("/v1/fleet/") for e in fleet)
    routes = {e["uri"] for e in fleet if e["status"] == "200"}
    assert {"/v1/fleet/activate-node", "/v1/fleet/send-node-heartbeat", "/v1/fleet/confirm-message-received"} \
        <= routes, routes
    # the sites' pulls and pushes go through the pull relay (server/pull_relay.py), and only they
    relayed = ("/v1/fleet/pull-messages", "/v1/fleet/pull-object", "/v1/fleet/push-messages", "/v1/fleet/push-object")
    pulls = [e for e in log if e["uri"] in relayed[:2] and e["status"] == "200"]
    (relay,) = {e["upstream"] for e in pulls}
    assert relay.startswith("127.0.0.1:") and relay != f"127.0.0.1:{consortium.loopback_port}"
    assert {e["uri"] for e in log if e["upstream"] == relay and e["status"] == "200"} == set(relayed)
    assert not routes & set(relayed)  # none of them straight to the SuperLink
    # held while the server had nothing for the site, answered with its message once there was one
    held = [e for e in pulls if e["uri"] == "/v1/fleet/pull-messages" and float(e["seconds"]) >= 1.0
            and int(e["sent"]) > 100]
    assert held, [(e["seconds"], e["sent"]) for e in pulls if e["uri"] == "/v1/fleet/pull-messages"]
    # the relay passes the SuperLink's refusal of a pull that is not signed at once, and takes no other route
    relay_port = int(relay.rsplit(":", 1)[1])
    unsigned = PullMessagesRequest(node=Node(node_id=int(min(nodes_before)))).SerializeToString()
    assert raw_request(consortium.port, "POST", "/v1/fleet/pull-messages", ca, body=unsigned) == 401
    assert raw_request(relay_port, "POST", "/v1/control/list-runs", None) == 404
    # the sites' masked updates (about 2 MB each) streamed through nginx's unprivileged worker
    assert max(int(e["bytes"]) for e in log if e["uri"] == "/v1/fleet/push-object" and e["status"] == "200") \
        > 1 << 20


def _ledgers(configs) -> dict[str, tuple[float, bytes]]:
    return {str(p): (p.stat().st_mtime, p.read_bytes()) for config in configs
            for p in sorted((config.state_dir / "ledgers").glob("*.json"))}


def _same_process(pid: int, cmdline: bytes) -> bool:
    """Whether ``pid`` still runs the command it ran when the test recorded it (not a pid used again since)."""
    return bool(cmdline) and _cmdline(pid) == cmdline


def _site_without_server(root: Path) -> Path:
    """A site pointed at a SuperLink that is not there: its SuperNode serves the Runtime API while it
    keeps retrying the connection, which is all the start and stop need."""
    from shared.processes import free_port

    root.mkdir(parents=True)
    (root / "manifest.csv").write_text("slide,label\n")
    site = root / "site.yaml"
    site.write_text(f"name: lonely\ndata: {{manifest: manifest.csv}}\n"
                    f"federation: {{server: '127.0.0.1:{free_port()}', port: {free_port()}}}\n")
    return site


def _group(pid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(int(p.name)) == pid]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _all_gone(pids: list[int], timeout: float = 15.0) -> bool:
    """Whether every pid ended (zombies waiting for their parent count as ended)."""
    def living(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
        except (OSError, IndexError):
            return False

    deadline = time.monotonic() + timeout
    while any(living(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(living(pid) for pid in pids)


def test_start_runs_supernode_and_runner_as_one_unit_that_stop_ends(tmp_path, capsys):
    """(A runner that cannot start: tests/test_task_runner.py, with a stand-in supervisor.)"""
    from client.cli import main as site_main

    site = _site_without_server(tmp_path / "lonely")
    state = load_site_config(site).state_dir
    assert site_main(["start", "--config", str(site), "--insecure", "--detach"]) == 0
    members: dict[int, bytes] = {}
    try:
        supervisor = recorded_pid(state / "supernode.pid")
        members = {pid: _cmdline(pid) for pid in _group(supervisor)}
        assert "SuperNode and task runner started" in capsys.readouterr().out  # returned once the runner was ready
        assert any(b"flower-supernode" in c and b"--isolation\x00process" in c for c in members.values()), members
        assert any(b"client.task_runner" in c for c in members.values()), members
        assert (state / "superexec.secret").stat().st_mode & 0o777 == 0o600
        assert site_main(["stop", "--config", str(site)]) == 0
        assert _all_gone(list(members)), "a process of the site outlived `fedpath-site stop`"
    finally:  # a failed check above leaves no site running (and signals no pid once they are all gone)
        if not _all_gone(list(members), timeout=0):
            site_main(["stop", "--config", str(site)])
            signal_each([pid for pid in members if _same_process(pid, members[pid])], signal.SIGKILL)

