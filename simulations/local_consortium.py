"""A real consortium on 127.0.0.1: one SuperLink behind its proxy and one SuperNode per generated
hospital, each a separate process started exactly as `fedpath-server start` and `fedpath-site
start` start them. Sites connect to the proxy's port, as hospitals do; the admin commands use the
SuperLink's loopback port, as on a consortium server.

Used by `make demo`, the integration tests and the federation benchmarks. Ports are free ports
picked at set-up, every wait is bounded, and ``close()`` (also on Ctrl-C or an error, through
the context manager) stops every process it started, by PID.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import yaml

from client.site_config import load_site_config
from client.supernode import start_supernode
from server.certificates import init_consortium
from server.registration import add_site
from server.run_control import submit_and_follow
from server.run_folder import RunFolder
from server.server_config import load_server_config
from server.site_registry import SiteRegistry
from server.superlink import FlowerControl, StatePaths, start_server, stop_server
from shared.processes import descendants, free_port, is_alive, running_pid, signal_each, stop
from shared.site_keys import keygen

KILL_WAIT_S = 10.0  # longest wait for SIGKILLed processes to be gone


@dataclass
class LocalConsortium:
    """A real consortium on this machine for the demo, tests and benchmarks: CA and certificates, the SuperLink
    behind its proxy and relay on free 127.0.0.1 ports, and one SuperNode with its task runner per site, each
    started, stopped and killed by PID. A context manager: leaving it stops everything it started.

    Args:
        root: where the server's folder goes (server.yaml, certificates, state).
        site_yamls: the hospitals, prepared (their keys are made and registered here).
        tls: TLS and node authentication (False: ``--insecure``, for quick local runs).
        server_settings: sections merged into the generated server.yaml (federation, training, ...).
    """

    root: Path
    site_yamls: list[Path]
    tls: bool = True
    server_settings: dict = field(default_factory=dict)  # merged into server.yaml (federation, training, ...)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.server_yaml = self.root / "server" / "server.yaml"
        self.port = free_port()  # the sites' port: the proxy
        self.loopback_port = free_port(avoid={self.port})  # the SuperLink itself
        self._write_server_yaml()
        for path in self.site_yamls:
            self._join_site(Path(path))

    # set-up
    def _write_server_yaml(self) -> None:
        settings = {"name": "local demo consortium", "classes": ["adenoma", "adenocarcinoma"],
                    "positive_class": "adenocarcinoma",
                    "superlink": {"host": "127.0.0.1", "port": self.port, "loopback_port": self.loopback_port}}
        for key, value in self.server_settings.items():
            settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
        self.server_yaml.parent.mkdir(parents=True, exist_ok=True)
        self.server_yaml.write_text(yaml.safe_dump(settings, sort_keys=False))
        if self.tls:
            certs = Path(self.config.superlink.certs_dir)
            if not (certs / "server.pem").exists():
                init_consortium(certs, "localhost")

    def _join_site(self, site_yaml: Path) -> None:
        """Point a site at this consortium's public port, as its IT would with what the admin handed over,
        and give it its share of this machine's cores unless site.yaml sets ``features.threads``."""
        document = yaml.safe_load(site_yaml.read_text())
        features = document.setdefault("features", {})
        if not features.get("threads"):  # the sites share this machine's cores (shared/devices.py: use_threads)
            features["threads"] = max(1, (os.cpu_count() or 1) // len(self.site_yamls))
        document["federation"] = {**document.get("federation", {}), "server": f"127.0.0.1:{self.port}",
                                  "port": free_port(),
                                  **({"ca_cert": str(Path(self.config.superlink.certs_dir) / "ca.pem")}
                                     if self.tls else {})}
        site_yaml.write_text(yaml.safe_dump(document, sort_keys=False))

    @property
    def config(self):
        return load_server_config(self.server_yaml)

    @property
    def control(self) -> FlowerControl:
        return FlowerControl(self.config, insecure=not self.tls)

    # processes
    def start_server(self) -> None:
        """The SuperLink and its proxy, as `fedpath-server start --detach` starts them."""
        start_server(self.config, insecure=not self.tls, detach=True)

    def start_site(self, index: int) -> None:
        path = self.site_yamls[index]
        start_supernode(load_site_config(path), path, insecure=not self.tls, detach=True)

    def register_sites(self) -> None:
        """Each hospital makes its key pair; the admin registers the public keys (TLS only:
        Flower ties SuperNode authentication to TLS). Every hospital then gets the consortium
        roster, the members' public keys (``roster.pub`` here; in a real consortium each hospital
        compares the fingerprints with the consortium agreement), unless its site.yaml names one."""
        registered = SiteRegistry(StatePaths(self.config).registry).entries()
        public_keys = []
        for path in self.site_yamls:
            site = load_site_config(path)
            key = Path(site.federation.auth_key)
            if not key.exists():
                keygen(key.parent, key.stem)
            public_keys.append(key.with_suffix(".pub").read_text().strip())
            if site.name not in registered:
                add_site(self.config, self.control, site.name, key.with_suffix(".pub"))
        roster = self.root / "roster.pub"
        roster.write_text("".join(f"{line}\n" for line in public_keys))
        for path in self.site_yamls:
            document = yaml.safe_load(Path(path).read_text())
            if "roster" not in document.setdefault("federation", {}):
                document["federation"]["roster"] = str(roster)
                Path(path).write_text(yaml.safe_dump(document, sort_keys=False))

    def start_all(self) -> None:
        self.start_server()
        if self.tls:
            self.register_sites()
        self.start_sites(range(len(self.site_yamls)))

    def start_sites(self, indices: Iterable[int]) -> None:
        """Start these sites side by side: each start waits until its task runner has imported torch
        and Opacus (seconds of CPU), and one after another they took three times as long. Raises the
        first site's error once every start has ended (the others run on; ``close()`` stops them)."""
        with ThreadPoolExecutor(max_workers=8) as pool:
            starts = [pool.submit(self.start_site, index) for index in indices]
        for started in starts:
            started.result()

    def stop_site(self, index: int) -> None:
        """Stop a site as `fedpath-site stop` does: its SuperNode signs off, and the SuperLink lists it offline."""
        stop(Path(load_site_config(self.site_yamls[index]).state_dir) / "supernode.pid")

    def kill_site(self, index: int) -> None:
        """SIGKILL a SuperNode and its ClientApp processes: a hospital machine that dies."""
        _kill(Path(load_site_config(self.site_yamls[index]).state_dir) / "supernode.pid")

    def kill_server(self) -> None:
        """SIGKILL the SuperLink, its ServerApp, the relay and the proxy: a server machine that crashes mid-round."""
        for _, pid_file in StatePaths(self.config).pid_files():
            _kill(pid_file)

    def run(self, follow: bool = True, timeout: float | None = None) -> tuple[int, RunFolder]:
        """Start a run of ``server_yaml`` in a new run folder; with ``follow``, wait for its outcome (at
        most ``timeout`` seconds, then FlowerError; the run goes on)."""
        folder = RunFolder.create(self.server_yaml)
        return submit_and_follow(self.control, folder, follow=follow, timeout=timeout), folder

    def resume(self, folder: RunFolder, timeout: float | None = None) -> int:
        """Resume ``folder``'s run and wait for its outcome, at most ``timeout`` seconds."""
        return submit_and_follow(self.control, folder, timeout=timeout)

    def close(self) -> None:
        for index in range(len(self.site_yamls)):
            self.stop_site(index)
        stop_server(StatePaths(self.config))

    def __enter__(self) -> "LocalConsortium":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kill(pid_file: Path) -> None:
    """SIGKILL a process, its group and every descendant (a crashed machine keeps none of them)."""
    pid = running_pid(pid_file)
    if pid is None:
        return
    family = descendants(pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    signal_each(family, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    # A killed process is gone only once the kernel has run its exit (a moment on a busy machine): wait
    # for all of them, so that nothing of the crashed machine still holds a port or reconnects.
    deadline = time.monotonic() + KILL_WAIT_S
    while any(is_alive(member) for member in [pid, *family]) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid_file.unlink(missing_ok=True)
