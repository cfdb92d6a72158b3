"""A simulation on a Ray cluster that already runs (``simulation.backend.address``).

The cluster is real: a head started with ``ray start --head --block`` on free ports of this machine, in
a process group of its own, stopped by PID (the group) when the module ends. What this does not prove
(other machines, shared storage, firewalls) is in docs/simulation.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from shared.processes import executable, flower_env, free_port, port_open
from shared.yaml_config import ConfigError
from simulations.process_tree import descendants, kill_leftovers
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
    """A one-node Ray cluster: (its address, its temp folder)."""
    port, client_port, dashboard_port = free_port(), free_port(), free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay short
    command = [executable("ray"), "start", "--head", "--block", "--port", str(port),
               "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--object-store-memory", str(100 * 2**20),
               "--ray-client-server-port", str(client_port), "--dashboard-port", str(dashboard_port),
               "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp)]
    log = (temp / "head.log").open("w")
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**flower_env(), "RAY_USAGE_STATS_ENABLED": "0"})
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
def test_three_sites_train_on_the_cluster(ray_head, prepared_hospitals, tmp_path):
    from simulations.cli import main

    address, temp = ray_head
    sim_yaml = write_sim(tmp_path, prepared_hospitals, backend={"address": address})
    document = yaml.safe_load(sim_yaml.read_text())
    document["federation"]["rounds"] = 1
    sim_yaml.write_text(yaml.safe_dump(document, sort_keys=False))
    out = tmp_path / "sim"
    assert main(["run", "--config", str(sim_yaml), "--out", str(out)]) == 0

    run = next((out / "runs").iterdir())
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and len(status["sites"]) == 3
    assert [r["round"] for r in json.loads((run / "metrics.json").read_text())] == [0, 1]
    # the ClientApps ran as actors of this cluster (Ray marks each actor's log with its class), not on a
    # Ray of the run's own
    logs = temp / "session_latest" / "logs"
    actors = [p for p in logs.glob("worker-*") if b":actor_name:ClientAppActor" in p.read_bytes()]
    assert actors, sorted(p.name for p in logs.iterdir())
