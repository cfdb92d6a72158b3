"""A simulation on a Ray cluster that already runs (``simulation.backend.address``).

The cluster is real: a head started with ``ray start --head --block`` on free ports of this machine, in
a process group of its own, stopped by PID (the group) when the module ends. What this does not prove
(other machines, shared storage, firewalls) is in docs/simulation.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from shared.processes import descendants, executable, flower_env, free_port, kill_leftovers, port_open
from shared.yaml_config import ConfigError
from simulations.ray_cluster import ClusterError, check_cluster
from simulations.sim_config import parse_sim_config
from tests.conftest import FEDERATION_CLASSES
from tests.test_simulation import write_sim

HEAD_START_S = 90.0


def test_an_address_is_a_cluster_and_a_cluster_has_its_own_cores():
    for address in ("auto", "ray://head.example.org:10001", "10.0.0.5:6379"):
        config = parse_sim_config({"classes": FEDERATION_CLASSES, "simulation": {"backend": {"address": address}}})
        assert config.simulation.backend.address == address
    for address in ("head.example.org", "ray://head", "http://head:6379", "head:port"):
        with pytest.raises(ConfigError, match="address.*auto, ray://HOST:PORT"):
            parse_sim_config({"classes": FEDERATION_CLASSES, "simulation": {"backend": {"address": address}}})
    with pytest.raises(ConfigError, match="has its own cores"):  # ray.init refuses num_cpus when it joins
        parse_sim_config({"classes": FEDERATION_CLASSES,
                          "simulation": {"backend": {"address": "auto", "cpus": 2}}})


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster: (its address, its RAY_TMPDIR).

    Started under its own RAY_TMPDIR, not Ray's default /tmp/ray: ``ray start`` records its address in
    RAY_TMPDIR/ray/ray_current_cluster, where ``ray.init()`` without an address would find it and join,
    so other tests' simulations (each with a Ray of its own) would land on this cluster. A test finds it
    with ``auto`` by setting the same RAY_TMPDIR."""
    port, client_port, dashboard_port = free_port(), free_port(), free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay short
    command = [executable("ray"), "start", "--head", "--block", "--port", str(port),
               "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--object-store-memory", str(100 * 2**20),
               "--ray-client-server-port", str(client_port), "--dashboard-port", str(dashboard_port),
               "--include-dashboard", "false", "--disable-usage-stats"]
    log = (temp / "head.log").open("w")
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**flower_env(), "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(temp)})
    try:
        deadline = time.monotonic() + HEAD_START_S
        while not (port_open("127.0.0.1", port) and "Ray runtime started" in (temp / "head.log").read_text()):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start: {(temp / 'head.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", temp
    finally:
        started = [head.pid, *descendants(head.pid)]
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` and every process it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        log.close()
        kill_leftovers(started, timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow(seconds=30)
def test_a_node_that_cannot_see_a_path_is_named_before_any_round(ray_head, tmp_path):
    address, _ = ray_head
    (tmp_path / "site.yaml").write_text("name: site-001\n")
    views = check_cluster(address, [tmp_path / "site.yaml"], [tmp_path])
    assert len(views) == 1 and not views[0].problems()
    missing = tmp_path / "elsewhere" / "cache"  # e.g. a disk only the researcher's machine mounts
    with pytest.raises(ClusterError) as refused:
        check_cluster(address, [tmp_path / "site.yaml", missing], [tmp_path])
    assert f"cannot read {missing}" in str(refused.value) and views[0].node in str(refused.value)


@pytest.mark.slow(seconds=105)
def test_three_travelling_sites_train_on_the_cluster_found_by_auto(ray_head, prepared_hospitals, tmp_path,
                                                                    monkeypatch):
    from simulations.cli import main

    address, temp = ray_head
    monkeypatch.setenv("RAY_TMPDIR", str(temp))  # where `ray start` recorded the head: what `auto` reads
    sim_yaml = write_sim(tmp_path, prepared_hospitals, backend={"address": "auto", "data": "travel"})
    document = yaml.safe_load(sim_yaml.read_text())
    document["federation"]["rounds"] = 1
    sim_yaml.write_text(yaml.safe_dump(document, sort_keys=False))
    out = tmp_path / "sim"
    assert main(["run", "--config", str(sim_yaml), "--out", str(out)]) == 0

    run = next((out / "runs").iterdir())
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and len(status["sites"]) == 3
    assert [r["round"] for r in json.loads((run / "metrics.json").read_text())] == [0, 1]
    cluster = json.loads((run / "simulation.json").read_text())["ray_cluster"]
    # `auto` found this head (Ray records its GCS under the machine's address, whatever --node-ip-address says)
    assert cluster["address"] == "auto" and cluster["data"] == "travel"
    assert cluster["joined"].rsplit(":", 1)[1] == address.rsplit(":", 1)[1] and len(cluster["nodes"]) == 1
    # the ClientApps ran as actors of this cluster (Ray marks each actor's log with its class), not on a
    # Ray of the run's own, and every training message of every site ran on a checked-out copy
    logs = temp / "ray" / "session_latest" / "logs"
    workers = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*"))
    assert ":actor_name:ClientAppActor" in workers, sorted(p.name for p in logs.iterdir())
    copies = {site: re.findall(rf"{site}: train message on a copy checked out at (\S+)", workers)
              for site in ("site-001", "site-002", "site-003")}
    assert all(len(set(found)) == 1 for found in copies.values()), copies  # one node, one copy per site
    for site, (copy, *_) in copies.items():
        assert Path(copy).name == site and (out / "sites").resolve() not in Path(copy).parents
        assert not Path(copy).exists()  # removed from the node at the end of the run
        # the privacy ledger spent on the node came back into the hospital's own state folder, with its
        # node id beside its site.yaml (which is how the run's reports name the site)
        ledger = json.loads((out / "sites" / site / "state" / "ledgers" / f"{run.name}.json").read_text())
        # round 1's message (the received model's evaluation, then training) and the final evaluation
        # message: the second message's copy started from the state the first one checked back in
        spent = [entry["round_id"] for entry in ledger["rounds"]]
        assert spent == ["round-1-evaluation", "round-1", "round-2-evaluation"], spent
        node = f"node-{(out / 'sites' / site / 'node-id').read_text().strip()}"
        assert node in status["sites"] and status["sites"][node]["epsilon"] > 0
    assert sorted(json.loads((run / "site_names.json").read_text()).values()) == list(copies)
