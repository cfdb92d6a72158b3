"""Who may join: a real SuperLink (TLS, SuperNode authentication) behind its proxy refuses
SuperNodes that are not registered or that do not trust the consortium's CA, and a revoked site is
cut off. Sites reach only the proxy's port; node authentication is decided by the SuperLink behind
it (the signed headers pass through), TLS by the proxy."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from client.site_config import load_site_config
from client.supernode import start_supernode
from server.certificates import init_consortium
from server.registration import add_site, remove_site
from server.superlink import StatePaths
from shared.site_keys import keygen
from simulations.local_consortium import LocalConsortium
from tests.consortium_runs import online_nodes, site_node, wait_for_site_log

pytestmark = pytest.mark.slow(seconds=180)  # in CI, three processes on two cores


def _site(root: Path, name: str) -> Path:
    """A site.yaml without data: joining needs no slides."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "manifest.csv").write_text("slide,label\n")
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump({"name": name, "data": {"manifest": "manifest.csv"}}))
    return path


def _refused(site_yaml: Path, timeout: float = 90) -> str:
    """The log of a started SuperNode that must be refused, once the refusal is in it. (The site's
    supervisor keeps retrying: a refusal right after a crash is temporary.)"""
    wait_for_site_log(site_yaml, "exited with code", timeout)
    return (load_site_config(site_yaml).state_dir / "supernode.log").read_text(errors="replace")


def _proxied(consortium: LocalConsortium, route: str) -> list[tuple[str, str]]:
    """(status, upstream) of each request for a Fleet route in the proxy's access log."""
    lines = StatePaths(consortium.config).proxy.access_log.read_text().splitlines()
    return [(line.split('" ')[1].split()[0], line.split("upstream=")[1].split()[0])
            for line in lines if f"POST /v1/fleet/{route} " in line]


def test_unregistered_untrusting_and_revoked_sites(tmp_path):
    sites = [_site(tmp_path, name) for name in ("hospital-a", "stranger", "no-ca", "plain")]
    with LocalConsortium(tmp_path / "consortium", sites) as consortium:  # TLS and authentication on
        consortium.start_server()
        superlink = f"127.0.0.1:{consortium.loopback_port}"
        assert all(load_site_config(s).federation.server == f"127.0.0.1:{consortium.port}" for s in sites)
        registered = load_site_config(sites[0])
        key = Path(registered.federation.auth_key)
        keygen(key.parent, key.stem)
        add_site(consortium.config, consortium.control, registered.name, key.with_suffix(".pub"))

        # a site with its own key, never registered
        stranger = Path(load_site_config(sites[1]).federation.auth_key)
        keygen(stranger.parent, stranger.stem)
        # a registered key, but the site trusts another CA
        other_ca = init_consortium(tmp_path / "other-ca", "localhost")
        document = yaml.safe_load(sites[2].read_text())
        document["federation"]["ca_cert"] = str(other_ca.ca_cert)
        sites[2].write_text(yaml.safe_dump(document))
        untrusting = Path(load_site_config(sites[2]).federation.auth_key)
        keygen(untrusting.parent, untrusting.stem)
        add_site(consortium.config, consortium.control, "no-ca", untrusting.with_suffix(".pub"))
        # a site started with --insecure; and the registered site. All four start side by side (each
        # start waits for its task runner).
        with ThreadPoolExecutor(max_workers=4) as pool:
            starts = [pool.submit(consortium.start_site, 0), pool.submit(consortium.start_site, 1),
                      pool.submit(consortium.start_site, 2),
                      pool.submit(start_supernode, load_site_config(sites[3]), sites[3], insecure=True, detach=True)]
        for started in starts:
            started.result()

        log = _refused(sites[1])
        assert "Failed to activate SuperNode" in log, log[-2000:]
        server_log = (consortium.root / "server" / "state" / "superlink.log").read_text()
        assert "activate-node][ApiError:2004] Attempted to register SuperNode with public key" in server_log
        assert ("412", superlink) in _proxied(consortium, "activate-node")  # refused by the SuperLink, via the proxy

        # the untrusting site: TLS fails before anything is sent
        log = _refused(sites[2])
        assert "certificate" in log.lower() or "ssl" in log.lower(), log[-2000:]

        # plain HTTP to the TLS port never gets a session
        plain_log = load_site_config(sites[3]).state_dir / "supernode.log"
        deadline = time.monotonic() + 60
        refused = ("Connection attempt failed", "could not establish a connection to the SuperLink")
        while not any(text in plain_log.read_text() for text in refused) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert any(text in plain_log.read_text() for text in refused), plain_log.read_text()[-2000:]
        assert set(_proxied(consortium, "register-node")) == {("400", "-")}  # the proxy's TLS port refused it

        # only the registered site joined; revoking it cuts it off
        node_id = site_node(consortium, registered.name)
        deadline = time.monotonic() + 60
        while not online_nodes(consortium) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert online_nodes(consortium) == {node_id}
        remove_site(consortium.config, consortium.control, registered.name)
        deadline = time.monotonic() + 120
        while len(online_nodes(consortium)) > 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(online_nodes(consortium)) == 0
