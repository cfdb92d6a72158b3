"""The control plane is reachable from the server host only (issue 13), on real processes.

An outsider holding just the consortium CA certificate (every hospital has it) talks to the sites'
port, which is the proxy: `flwr ls`, `flwr supernode ls`, `flwr supernode register`, `flwr run`,
raw requests to the Control and Runtime APIs, /docs and /openapi.json are all refused at the
proxy, the SuperLink is never contacted and its state does not change. Meanwhile the admin
commands work on the loopback port and registered sites train a real round through the proxy.
`sites` flags a node registered past the registry; `start` and `stop` treat the SuperLink and its
proxy as one unit. Ports are free ports on 127.0.0.1, every wait is bounded, every process is
stopped by PID.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=no-name-in-module

from server.certificates import init_consortium
from server.cli import main as server_main
from server.dashboard import DashboardData
from server.fleet_proxy import ProxyError, ProxyFiles, prepare_proxy, start_proxy
from server.run_control import follow_run
from server.run_folder import RunFolder
from server.server_config import load_server_config
from server.site_registry import SiteRegistry
from server.superlink import APP_DIR, CONNECTION, StatePaths
from shared.processes import executable, flower_env, free_port, port_open, running_pid, stop, stop_pid
from shared.site_keys import keygen
from simulations.local_consortium import LocalConsortium
from tests.conftest import copy_hospitals

pytestmark = pytest.mark.slow(seconds=340)  # in CI, three processes on two cores

REFUSED = [  # (method, path, status at the proxy): nothing but a Fleet route reaches the SuperLink
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


def _request(port: int, method: str, path: str, ca: Path | None, body: bytes = b"",
             headers: dict[str, str] | None = None) -> int:
    """One raw request, the path sent exactly as given (no client-side normalisation)."""
    if ca is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    else:
        context = ssl.create_default_context(cafile=str(ca))
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    try:
        connection.request(method, path, body=body if method == "POST" else None,
                           headers={"Content-Type": "application/protobuf", **(headers or {})})
        return connection.getresponse().status
    finally:
        connection.close()


def _access_log(consortium: LocalConsortium) -> list[dict]:
    pattern = re.compile(r'"(?P<method>\S+) (?P<uri>\S+) [^"]*" (?P<status>\d+) \d+ request_bytes=(?P<bytes>\d+) '
                         r'upstream=(?P<upstream>\S+)')
    text = StatePaths(consortium.config).proxy.access_log.read_text()
    return [m.groupdict() for m in map(pattern.search, text.splitlines()) if m]


def _outsider_flwr(home: Path, *args: str) -> dict:
    """`flwr` as someone with only ca.pem and the sites' address would run it."""
    result = subprocess.run([executable("flwr"), *args, "--format", "json"], capture_output=True, text=True,
                            env=flower_env(home), cwd=home.parent, timeout=120, check=False)
    return json.loads(result.stdout[result.stdout.find("{"):])


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout:g} s")
        time.sleep(0.5)


def test_outsider_with_the_ca_certificate_is_refused_while_sites_train_through_the_proxy(
        prepared_hospitals, tmp_path, nginx, capsys):
    sites = copy_hospitals(prepared_hospitals, tmp_path, 2)
    # SecAgg+ off keeps the round short (these two sites accept plain rounds for it);
    # tests/test_secure_aggregation.py runs SecAgg+ through the proxy
    for site in sites:
        document = yaml.safe_load(site.read_text())
        document.setdefault("federation", {})["require_secure_aggregation"] = False
        site.write_text(yaml.safe_dump(document))
    settings = {"federation": {"rounds": 1, "min_sites": 2, "round_timeout": 180},
                "secure_aggregation": {"enabled": False},
                "training": {"epochs": 1, "batch_size": 2, "learning_rate": 0.003}}
    with LocalConsortium(tmp_path / "consortium", sites, server_settings=settings) as consortium:
        consortium.start_all()
        nodes_before = {n["node-id"] for n in consortium.control.nodes()}
        # the admin submits from the server host (loopback port); the outsider tries while it starts
        assert server_main(["run", "--config", str(consortium.server_yaml), "--no-follow"]) == 0
        (folder,) = [RunFolder.open(p) for p in consortium.config.results_dir.iterdir()]
        (run_id,) = folder.run_info()["flower_runs"]

        outsider = tmp_path / "outsider"
        home = outsider / "flwr"
        home.mkdir(parents=True)
        ca = Path(shutil.copy(consortium.config.superlink.certs_dir / "ca.pem", outsider / "ca.pem"))
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                          f'address = "127.0.0.1:{consortium.port}"\nroot-certificates = "{ca}"\n')
        keygen(outsider, "intruder")
        for command, route in FLWR_ROUTES.items():
            args = command.replace("KEY", str(outsider / "intruder.pub")).replace("APP", str(APP_DIR)).split()
            answer = _outsider_flwr(home, *args)
            assert answer["success"] is False, (args, answer)
            assert f"404 Not Found' for url 'https://127.0.0.1:{consortium.port}/v1/control/{route}'" in \
                answer["error-message"], (args, answer)

        for method, path, status in REFUSED:
            assert _request(consortium.port, method, path, ca) == status, (method, path)
        # the same requests on the loopback port reach the SuperLink: the refusals above are the proxy's
        assert _request(consortium.loopback_port, "GET", "/openapi.json", ca) == 200
        assert _request(consortium.loopback_port, "POST", "/v1/control/list-runs", ca) == 200
        # a Fleet route does reach the SuperLink, whose node authentication still refuses a stranger,
        # also with a body well above the proxy's 1 MB buffer (it streams, nothing spooled to disk)
        big = PushObjectRequest(object_content=os.urandom(5 << 20)).SerializeToString()
        assert _request(consortium.port, "POST", "/v1/fleet/push-object", ca, body=big) == 401
        # a body above superlink.max_request_mb (64 MB) is refused from its Content-Length alone
        assert _request(consortium.port, "POST", "/v1/fleet/push-object", ca,
                        headers={"Content-Length": str(65 << 20)}) == 413
        # the SuperLink's state did not change: the registered nodes only, the admin's run only
        assert {n["node-id"] for n in consortium.control.nodes()} == nodes_before
        assert [int(r["run-id"]) for r in consortium.control.runs()] == [run_id]

        # meanwhile the registered sites train a real round through the proxy
        assert follow_run(consortium.control, folder, run_id, timeout=300) == 0
        assert folder.status()["state"] == "finished"
        capsys.readouterr()
        assert server_main(["sites", "--config", str(consortium.server_yaml)]) == 0
        table = capsys.readouterr().out
        assert re.search(r"site-1 +\d+ +online", table) and re.search(r"site-2 +\d+ +online", table), table
        assert "UNKNOWN" not in table and "MISSING" not in table

        log = _access_log(consortium)
        refused = {(method, path) for method, path, _ in REFUSED} | \
            {("POST", f"/v1/control/{route}") for route in FLWR_ROUTES.values()}
        outsider_lines = [e for e in log if (e["method"], e["uri"]) in refused]
        assert {(e["method"], e["uri"]) for e in outsider_lines} == refused
        assert all(e["upstream"] == "-" for e in outsider_lines), outsider_lines  # never passed on
        assert [e["upstream"] for e in log if e["status"] == "413"] == ["-"]
        assert not any(p.is_file() for p in StatePaths(consortium.config).proxy.temp.rglob("*"))

        fleet = [e for e in log if e["upstream"] == f"127.0.0.1:{consortium.loopback_port}"]
        assert all(e["uri"].startswith("/v1/fleet/") for e in fleet)
        routes = {e["uri"] for e in fleet if e["status"] == "200"}
        assert {"/v1/fleet/activate-node", "/v1/fleet/pull-messages", "/v1/fleet/push-messages",
                "/v1/fleet/push-object", "/v1/fleet/pull-object", "/v1/fleet/send-node-heartbeat"} <= routes, routes
        # the sites' model updates (about 1 MB each) streamed through nginx's unprivileged worker
        assert max(int(e["bytes"]) for e in fleet if e["uri"] == "/v1/fleet/push-object" and e["status"] == "200") \
            > 1 << 20


def test_sites_flags_a_node_registered_past_the_registry(tmp_path, nginx, capsys):
    consortium = LocalConsortium(tmp_path / "consortium", [])
    config = ["--config", str(consortium.server_yaml)]
    paths = StatePaths(consortium.config)
    try:
        assert server_main(["start", *config, "--detach"]) == 0
        pids = [running_pid(paths.pid), running_pid(paths.proxy.pid)]
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
        assert "stopped: proxy (pid" in capsys.readouterr().out
        assert running_pid(paths.pid) is None and running_pid(paths.proxy.pid) is None
        assert not port_open("127.0.0.1", consortium.port) and not port_open("127.0.0.1", consortium.loopback_port)
    finally:
        consortium.close()


def test_foreground_start_runs_and_stops_both_as_one_unit(tmp_path, nginx):
    """Ctrl-C, SIGTERM, or either process dying: the foreground `start` stops both."""
    consortium = LocalConsortium(tmp_path / "consortium", [], tls=False)
    paths = StatePaths(consortium.config)
    command = [sys.executable, "-m", "server.cli", "start", "--config", str(consortium.server_yaml), "--insecure"]
    try:
        for ending, expected in (("SIGINT", 130), ("SIGTERM", 130), ("proxy killed", 128 + signal.SIGKILL)):
            output = tmp_path / f"start-{ending.replace(' ', '-')}.out"
            with output.open("wb") as out:
                start = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                _wait(lambda: port_open("127.0.0.1", consortium.port) and running_pid(paths.pid) is not None,
                      60, f"the SuperLink and its proxy ({ending})")
                pids = [running_pid(paths.pid), running_pid(paths.proxy.pid)]
                # plain HTTP with --insecure, the same filter
                assert _request(consortium.port, "GET", "/docs", None) == 404
                assert _request(consortium.port, "POST", "/v1/fleet/get-run", None) != 404
                if ending == "proxy killed":
                    os.kill(pids[1], signal.SIGKILL)
                else:
                    start.send_signal(getattr(signal, ending))
                try:
                    code = start.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"`fedpath-server start` still running 60 s after {ending}; its output:\n"
                                f"{output.read_text()[-3000:]}")
                assert code == expected, (ending, output.read_text()[-3000:])
                assert running_pid(paths.pid) is None and running_pid(paths.proxy.pid) is None, ending
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
