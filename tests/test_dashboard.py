"""`fedpath-server dashboard` in a real headless browser: Debian's chromium driven by Selenium through
Debian's chromedriver, against a run folder written by the ServerApp's own RunRecorder (100 rounds, three
sites, one that runs out of budget), served by the real command in a process of its own.

Both processes are stopped by PID when the module ends. The browser, the driver and the command are
never skipped for: `make install` installs chromium and chromium-driver as root; missing, the test fails
and says so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server.certificates import init_consortium
from server.run_folder import RunFolder
from server.run_recorder import RunRecorder
from server.server_config import load_server_config
from server.site_registry import SiteRegistry
from server.superlink import StatePaths
from shared.processes import descendants, free_port, kill_leftovers, port_open
from tests.conftest import FEDERATION_CLASSES, disclosed_site, record_round
from tests.consortium_runs import raw_request

pytestmark = pytest.mark.slow(seconds=60)

ROUNDS = 100
SITES = ("east", "north", "south")
BROWSER, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 60.0
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "dashboard.png"


def _sites(round_: int) -> dict:
    """ε grows with the rounds; east, whose own budget (7) is below the consortium's, runs out at round 96
    and tells the admin why."""
    sites = {name: disclosed_site(epsilon=round(7.2 * round_ / ROUNDS * (1 + 0.05 * i), 6))
             for i, name in enumerate(SITES)}
    if round_ > 95:
        sites["east"] = disclosed_site(epsilon=6.84, refused=1, would_spend=7.05, budget_epsilon=7.0)
    return sites


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    """A server.yaml and one run folder: rounds 0 to ROUNDS - 1 recorded, the last one still to come."""
    root = tmp_path_factory.mktemp("dashboard")
    (root / "server.yaml").write_text(f"name: dashboard test consortium\nclasses: {FEDERATION_CLASSES}\n"
                                      f"model: {{projection: 4, hidden: 2}}\nfederation: {{rounds: {ROUNDS}}}\n")
    folder = RunFolder.create(root / "server.yaml")
    registry = SiteRegistry(StatePaths(folder.config()).registry)
    for i, name in enumerate(SITES):  # registered hospitals (no SuperLink here says who is online)
        registry.add(name, 10**18 + i, f"ecdsa-sha2-nistp384 AAAA{name}", f"SHA256:{name}-key-fingerprint")
    rng = np.random.default_rng(0)
    from shared.model import ModelConfig, build_head
    from shared.parameters import model_arrays

    arrays = model_arrays(build_head(ModelConfig(projection=4, hidden=2), 2))
    recorder = RunRecorder(folder, folder.config(), list(arrays))
    for round_ in range(ROUNDS):
        accuracy = 0.5 + 0.4 * round_ / ROUNDS + rng.normal(0, 0.01)
        record_round(recorder, round_, arrays.values(), _sites(round_),
                     {"accuracy": accuracy, "balanced_accuracy": accuracy - 0.02, "auc": accuracy + 0.03})
    return root, folder, recorder, arrays


def _start(root: Path, host: str = "127.0.0.1") -> tuple[subprocess.Popen, int]:
    """The real command in a process of its own, listening."""
    port = free_port()
    log = root / f"dashboard-{host}.log"
    with log.open("w") as handle:
        process = subprocess.Popen([str(Path(sys.executable).parent / "fedpath-server"), "dashboard", "--config",
                                    str(root / "server.yaml"), "--host", host, "--port", str(port), "--no-superlink"],
                                   stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + WAIT_S
    while not port_open(host, port):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            pytest.fail(f"the dashboard did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return process, port


def _port(url: str) -> int:
    """The port of the dashboard fixture's URL (http://127.0.0.1:PORT/)."""
    return int(url.rsplit(":", 1)[1].strip("/"))


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def dashboard(consortium):
    process, port = _start(consortium[0])
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def browser():
    missing = [path for path in (BROWSER, DRIVER) if not Path(path).is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: `make install` installs Debian's chromium and chromium-driver "
                    "as root (apt-get install chromium chromium-driver)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,2300"):
        options.add_argument(argument)
    service = Service(executable_path=DRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    started = [service.process.pid, *descendants(service.process.pid)]
    try:
        yield driver
    finally:
        started += descendants(service.process.pid)
        driver.quit()
        kill_leftovers(started, timeout=15)


def _wait(driver, script: str, expected, what: str):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value == expected:
            return value
        time.sleep(0.2)
    pytest.fail(f"{what}: {script} gave {value!r}, expected {expected!r} within {WAIT_S} s")


def test_the_page_shows_every_round_each_sites_epsilon_and_follows_the_run(consortium, dashboard, browser, tmp_path):
    root, folder, recorder, arrays = consortium
    browser.get(dashboard)
    _wait(browser, "return document.body.dataset.rounds", str(ROUNDS), "rounds 0 to 99 drawn")
    first_render_ms = int(browser.execute_script("return document.body.dataset.firstRenderMs"))
    print(f"time to first render of a {ROUNDS}-round run folder: {first_render_ms} ms")  # docs/benchmarks.md
    (tmp_path / "first_render.json").write_text(json.dumps({"rounds": ROUNDS, "first_render_ms": first_render_ms}))

    rows = browser.execute_script("return [...document.querySelectorAll('#rounds tbody tr')].map(r => r.dataset.round)")
    assert sorted(map(int, rows)) == list(range(ROUNDS))
    shown = {row["site"]: row for row in browser.execute_script(
        "return [...document.querySelectorAll('#epsilon tbody tr')].map(r => "
        "({site: r.dataset.site, cells: [...r.cells].map(c => c.textContent)}))")}
    status = folder.status()
    assert set(shown) == set(SITES)
    for name in SITES:
        assert shown[name]["cells"][1] == f"{status['sites'][name]['epsilon']:.3f}"
        assert shown[name]["cells"][2] == "8"  # the consortium's budget (privacy.epsilon's default)
    assert shown["east"]["cells"][3] == "7" and shown["north"]["cells"][3] == "not disclosed"
    refusals = browser.execute_script(
        "return [...document.querySelectorAll('#refusals tbody tr')].map(r => [...r.cells].map(c => c.textContent))")
    assert [(r[0], r[1], r[2]) for r in refusals] == [(str(n), "east", "1") for n in range(96, ROUNDS)]
    assert all("budget" in r[3] for r in refusals)
    audit = browser.find_element("id", "audit")
    assert audit.text == f"intact: {ROUNDS} records, the last one matches status.json"
    assert "not reachable (not asked (--no-superlink))" in browser.find_element("id", "superlink").text
    registered = browser.execute_script(
        "return [...document.querySelectorAll('#sites tbody tr')].map(r => [...r.cells].map(c => c.textContent))")
    assert [(r[0], r[1], r[2]) for r in registered] == [(name, str(10**18 + i), "?") for i, name in enumerate(SITES)]
    traces = browser.execute_script(
        "return document.getElementById('accuracy-chart').data.map(t => [t.name, t.x.length])")
    assert traces == [["global", ROUNDS]]  # Plotly drew the curve of every round
    bars = browser.execute_script("return document.getElementById('epsilon-chart').data[0].y")
    assert bars == pytest.approx([status["sites"][name]["epsilon"] for name in SITES])

    # the last round finishes while the page is open: it appears without a reload
    record_round(recorder, ROUNDS, arrays.values(), _sites(ROUNDS), {"accuracy": 0.91, "auc": 0.94})
    folder.write_status(state="finished", message="all rounds done")
    _wait(browser, "return document.body.dataset.rounds", str(ROUNDS + 1), "the new round drawn")
    assert browser.find_element("id", "run-title").text.startswith(f"Run {folder.path.name}: finished, round {ROUNDS}")
    if os.environ.get("FEDPATH_SCREENSHOT"):  # refresh docs/dashboard.png
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        shutil.copyfile(tmp_path / "dashboard.png", SCREENSHOT)


def test_a_run_name_is_never_a_path(dashboard, consortium):
    """A real run folder lies beside the results folder: a name that reached the file system as a path would
    open it. Each attack goes out byte for byte (no client-side normalisation) and is refused; the run's own
    name, asked the same way, is served."""
    import httpx

    from server.dashboard import DashboardData

    root, folder = consortium[0], consortium[1]
    stolen = root / "stolen"
    if not stolen.exists():
        shutil.copytree(folder.path, stolen)
    assert folder.path.parent != root and (stolen / "run.json").is_file()
    port = _port(dashboard)
    assert raw_request(port, "GET", f"/api/runs/{folder.path.name}", None) == 200
    for path in ("/api/runs/..", "/api/runs/%2E%2E", "/api/runs/..%2Fstolen", "/api/runs/%2E%2E%2Fstolen",
                 "/api/runs/../stolen", "/api/runs/..%5Cstolen", "/api/runs/nonexistent"):
        assert raw_request(port, "GET", path, None) == 404, path
    data = DashboardData(load_server_config(root / "server.yaml"), None)
    assert data.run(folder.path.name)["name"] == folder.path.name
    for name in ("..", "../stolen", f"../{folder.path.parent.name}/{folder.path.name}", str(stolen)):
        with pytest.raises(KeyError):
            data.run(name)
    assert httpx.post(f"{dashboard}api/state", timeout=10).status_code == 405  # read-only


def test_on_loopback_only_a_loopback_host_name_is_answered(dashboard):
    """DNS rebinding: a page the admin opens elsewhere rebinds its own name to 127.0.0.1 and reads the JSON
    routes from the admin's browser, with its own name in the Host header."""
    port = _port(dashboard)
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example:1"):
        assert raw_request(port, "GET", "/api/state", None, headers={"Host": host}) == 400, host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert raw_request(port, "GET", "/api/state", None, headers={"Host": host}) == 200, host


def test_a_broken_run_folder_or_registry_hides_nothing_else(consortium, tmp_path):
    from server.dashboard import DashboardData

    root, folder = consortium[0], consortium[1]
    (tmp_path / "server.yaml").write_text((root / "server.yaml").read_text())
    config = load_server_config(tmp_path / "server.yaml")
    shutil.copytree(folder.path, config.results_dir / folder.path.name)
    (config.results_dir / "0-broken").mkdir()
    (config.results_dir / "0-broken" / "run.json").write_text("{}")  # config.json and status.json missing
    shutil.copytree(folder.path, config.results_dir / "0-not-an-object")
    (config.results_dir / "0-not-an-object" / "status.json").write_text("[]")  # valid JSON, not a status
    registry = StatePaths(config).registry
    registry.parent.mkdir(parents=True, exist_ok=True)
    registry.write_text("[]")  # a hand edit gone wrong
    overview = DashboardData(config, None).overview()
    states = {run["name"]: run["state"] for run in overview["runs"]}
    assert states[folder.path.name] in ("running", "finished") and states["0-broken"] == "unreadable"
    assert states["0-not-an-object"] == "unreadable"
    assert overview["sites"] == [] and "not a site registry" in overview["superlink"]["error"]


def test_a_slow_superlink_holds_back_no_other_request(consortium, monkeypatch):
    """A `flwr` call may take up to 120 s: while one request asks, the others get the table of before, or before
    the first answer the registry alone; never a second `flwr` call (each would hold a server thread)."""
    import threading

    import server.dashboard
    from server.dashboard import DashboardData

    class SlowControl:
        def __init__(self) -> None:
            self.release, self.asking, self.calls = threading.Event(), threading.Event(), 0

        def nodes(self) -> list[dict]:
            self.calls += 1
            self.asking.set()
            assert self.release.wait(60)
            return [{"node-id": str(10**18), "status": "online", "created-at": "2026-12-05 04:00:00Z"}]

    def ask_meanwhile(data: DashboardData, control: SlowControl) -> dict:
        control.asking.clear()
        control.release.clear()
        asking = threading.Thread(target=data.sites)
        asking.start()
        try:
            assert control.asking.wait(30)
            return data.sites()  # while the other request waits on flwr
        finally:
            control.release.set()
            asking.join(30)

    control = SlowControl()
    data = DashboardData(load_server_config(consortium[0] / "server.yaml"), control)
    placeholder = ask_meanwhile(data, control)
    assert control.calls == 1 and placeholder["superlink"]["error"] == "asking the SuperLink"
    assert [row["name"] for row in placeholder["sites"]] == list(SITES)  # the registry, at once
    first = data.sites()
    assert first["superlink"]["reachable"] and control.calls == 1  # the answer the first request got, cached
    monkeypatch.setattr(server.dashboard, "SITES_TTL_S", 0.0)  # every request wants a fresh table
    assert ask_meanwhile(data, control) is first and control.calls == 2  # the table of before, at once
    assert data.sites() is not first and control.calls == 3


def test_another_address_is_served_over_https_with_the_consortium_certificate_or_not_at_all(consortium):
    import httpx

    root = consortium[0]
    host = "127.0.0.2"  # loopback too, but not the default: treated as any other address
    refused = subprocess.run([str(Path(sys.executable).parent / "fedpath-server"), "dashboard", "--config",
                              str(root / "server.yaml"), "--host", host, "--port", str(free_port())],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "over HTTPS only" in refused.stderr and "server.pem" in refused.stderr
    files = init_consortium(root / "certs", host, sans=[host])  # `fedpath-server init`, where server.yaml looks
    process, port = _start(root, host)
    try:
        state = httpx.get(f"https://{host}:{port}/api/state", verify=str(files.ca_cert), timeout=10).json()
        assert state["consortium"] == "dashboard test consortium"
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on that address
            httpx.get(f"http://{host}:{port}/api/state", timeout=10)
        with pytest.raises(httpx.ConnectError):  # nor HTTPS for a client that does not trust the consortium's CA
            httpx.get(f"https://{host}:{port}/api/state", timeout=10)
    finally:
        _stop(process)
