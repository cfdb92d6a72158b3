"""The control plane is reachable from the server host only (issue 13), on real processes.

`sites` flags a node registered past the registry; `start` and `stop` treat the SuperLink and its
proxy as one unit; the proxy passes nothing to a loopback listener the consortium's CA did not
certify. An outsider holding just the consortium CA certificate, refused at the proxy while the
sites train through it, plays on the consortium of tests/test_site_runner.py (one consortium start
fewer). Ports are free ports on 127.0.0.1, every wait is bounded, every process is stopped by PID.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from server.certificates import init_consortium
from server.cli import main as server_main
from server.dashboard import DashboardData
from server.fleet_proxy import ProxyError, ProxyFiles, prepare_proxy, start_proxy
from server.server_config import load_server_config
from server.site_registry import SiteRegistry
from server.superlink import CONNECTION, StatePaths
from shared.processes import executable, flower_env, free_port, port_open, running_pid, stop, stop_pid
from shared.site_keys import keygen
from simulations.local_consortium import LocalConsortium
from tests.consortium_runs import raw_request

pytestmark = pytest.mark.slow(seconds=90)  # in CI, three processes on two cores



def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout:g} s")
        time.sleep(0.5)


def test_sites_flags_a_node_registered_past_the_registry(tmp_path, nginx, capsys):
    consortium = LocalConsortium(tmp_path / "consortium", [])
    config = ["--config", str(consortium.server_yaml)]
    paths = StatePaths(consortium.config)
    try:
        assert server_main(["start", *config, "--detach"]) == 0
        pids = [running_pid(pid_file) for _, pid_file in paths.pid_files()]  # proxy, pull relay, SuperLink
        assert None not in pids
        keygen(tmp_path / "keys", "hospital-a")
        keygen(tmp_path / "keys", "intruder")
        assert server_main(["add-site", "hospital-a", str(tmp_path / "keys" / "hospital-a.pub"), *config]) == 0
        # someone with a shell on the server registers a key directly, past `fedpath-server add-site`
        result = subprocess.run([executable("flwr"), "supernode", "register", str(tmp_path / "keys" / "intruder.pub"),
                                 CONNECTION, "--format", "json"], capture_output=True, text=True,
                                env=flower_env(paths.flwr_home), cwd=paths.dir, timeout=120, check=True)
        intruder = int(json.loads(result.stdout[result.stdout.find("{"):])["node-id"])
        capsys.readouterr()

        assert server_main(["sites", *config]) == 1
        table = capsys.readouterr().out
        (line,) = [line for line in table.splitlines() if str(intruder) in line]
        assert line.startswith("UNKNOWN") and "UNKNOWN — not in the consortium registry" in line
        (line,) = [line for line in table.splitlines() if line.startswith("hospital-a")]
        assert "registered" in line and "UNKNOWN" not in line and "MISSING" not in line
        assert "flwr supernode unregister NODE_ID" in table

        # and a site the registry names but the SuperLink does not know (another state.db)
        SiteRegistry(paths.registry).add("ghost", 4242, "ecdsa-sha2-nistp384 AAAA", "SHA256:ghost")
        assert server_main(["sites", *config]) == 1
        (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ghost")]
        assert "MISSING — registered here, unknown to the SuperLink" in line

        # the dashboard flags the same nodes, from the same running SuperLink
        overview = DashboardData(consortium.config, consortium.control).overview()
        assert overview["superlink"]["reachable"]
        flags = {row["node_id"]: (row["name"], row["flag"]) for row in overview["sites"]}
        assert flags[str(intruder)] == ("UNKNOWN", "UNKNOWN — not in the consortium registry")
        assert flags["4242"] == ("ghost", "MISSING — registered here, unknown to the SuperLink")
        assert [flag for name, flag in flags.values() if name == "hospital-a"] == [""]

        assert server_main(["stop", *config]) == 0
        assert re.search(r"stopped: proxy \(pid \d+\), pull relay \(pid \d+\), SuperLink \(pid \d+\)",
                         capsys.readouterr().out)
        assert all(running_pid(pid_file) is None for _, pid_file in paths.pid_files())
        assert not any(_alive(pid) for pid in pids)
        assert not port_open("127.0.0.1", consortium.port) and not port_open("127.0.0.1", consortium.loopback_port)
    finally:
        consortium.close()


def test_with_no_superlink_run_leaves_no_run_folder_and_status_exits_1(tmp_path, capsys):
    """A run that never reached the SuperLink used to stay listed as 'submitted' for ever; a status that could not
    reach it exited 0, which watching scripts read as healthy."""
    consortium = LocalConsortium(tmp_path / "consortium", [], tls=False)  # configured, nothing started
    assert server_main(["run", "--config", str(consortium.server_yaml), "--insecure", "--no-follow"]) == 2
    assert "No run was started (its folder is removed). Is the SuperLink running?" in capsys.readouterr().err
    results = Path(consortium.config.results_dir)
    assert not results.exists() or not any(results.iterdir())
    assert server_main(["status", "--config", str(consortium.server_yaml), "--insecure"]) == 1
    out = capsys.readouterr().out
    assert "NOT REACHABLE; is it started (`fedpath-server start --config SERVER_YAML`)?" in out
    assert "runs in" in out and ": 0" in out


def test_foreground_start_runs_and_stops_its_processes_as_one_unit(tmp_path, nginx):
    """Ctrl-C, SIGTERM (also repeated while it stops them, as a service manager may), or any of its
    processes dying: the foreground `start` stops them all."""
    consortium = LocalConsortium(tmp_path / "consortium", [], tls=False)
    paths = StatePaths(consortium.config)
    command = [sys.executable, "-m", "server.cli", "start", "--config", str(consortium.server_yaml), "--insecure"]
    env = dict(os.environ, PYTHONFAULTHANDLER="1")  # a hang below is reported with every thread's stack
    try:
        for ending, expected in (("SIGINT", 130), ("SIGTERM", 130), ("SIGTERM twice", 130),
                                 ("proxy killed", 128 + signal.SIGKILL), ("relay killed", 128 + signal.SIGKILL)):
            output = tmp_path / f"start-{ending.replace(' ', '-')}.out"
            with output.open("wb") as out:
                start = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=env)
            try:
                _wait(lambda: port_open("127.0.0.1", consortium.port) and running_pid(paths.pid) is not None,
                      60, f"the SuperLink and its proxy ({ending})")
                pids = [running_pid(paths.proxy.pid), running_pid(paths.relay_pid), running_pid(paths.pid)]
                assert None not in pids, ending
                # plain HTTP with --insecure, the same filter
                assert raw_request(consortium.port, "GET", "/docs", None) == 404
                assert raw_request(consortium.port, "POST", "/v1/fleet/get-run", None) != 404
                if ending.endswith("killed"):
                    os.kill(pids[0 if ending == "proxy killed" else 1], signal.SIGKILL)
                else:
                    start.send_signal(getattr(signal, ending.split()[0]))
                if ending == "SIGTERM twice":  # the second one arrives while both are being stopped, or after
                    time.sleep(0.1)
                    start.send_signal(signal.SIGTERM)
                try:
                    code = start.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    start.send_signal(signal.SIGABRT)  # faulthandler prints where it hangs
                    start.wait(timeout=10)
                    pytest.fail(f"`fedpath-server start` still running 60 s after {ending}; its output:\n"
                                f"{output.read_text()[-6000:]}")
                # a second SIGTERM after the clean-up ends the command with Python's default for it
                assert code == expected or (ending == "SIGTERM twice" and code == -signal.SIGTERM), \
                    (ending, code, output.read_text()[-3000:])
                assert all(running_pid(pid_file) is None for _, pid_file in paths.pid_files()), ending
                assert not any(_alive(pid) for pid in pids), ending
                assert not port_open("127.0.0.1", consortium.port), ending
            finally:
                if start.poll() is None:
                    stop_pid(start.pid)
    finally:
        consortium.close()


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent that is gone (reparented processes)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_proxy_passes_nothing_to_a_loopback_listener_the_consortium_ca_did_not_certify(tmp_path, nginx):
    """Whoever takes the loopback port first (the SuperLink down, another local program) gets no
    site's request: the proxy checks the SuperLink's certificate against the consortium CA."""
    ours = init_consortium(tmp_path / "ours", "fl.example")
    other = init_consortium(tmp_path / "other", "fl.example")
    loopback = free_port()
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump({"classes": ["a", "b"], "superlink": {
        "port": free_port(avoid={loopback}), "loopback_port": loopback}}))
    superlink = load_server_config(path).superlink
    requests: list[str] = []

    class Impostor(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            requests.append(self.path)
            self.send_response(200)
            self.end_headers()

    impostor = http.server.ThreadingHTTPServer(("127.0.0.1", loopback), Impostor)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(other.server_cert, other.server_key)
    impostor.socket = context.wrap_socket(impostor.socket, server_side=True)
    thread = threading.Thread(target=impostor.serve_forever, daemon=True)
    thread.start()
    files = ProxyFiles.in_state_dir(superlink.state_dir)
    try:
        binary = prepare_proxy(superlink, files, ours)
        expected = r"(?s)does not reach the SuperLink .*does not trust its certificate.*certificate verify error"
        with pytest.raises(ProxyError, match=expected):
            start_proxy(superlink, files, ours, binary, ready_timeout=5)
        assert running_pid(files.pid) is None and not port_open("127.0.0.1", superlink.port)
        assert requests == []
    finally:
        stop(files.pid)
        impostor.shutdown()
        impostor.server_close()
        thread.join(timeout=10)
