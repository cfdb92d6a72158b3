"""The consortium server's processes and the `flwr` control commands that talk to them.

`fedpath-server start` runs two processes as one unit: ``flower-superlink`` on
``127.0.0.1:loopback_port`` only, with a SQLite state database (runs and registered sites survive
a restart), a log file, no run-time package installation and TLS unless ``--insecure``; and in
front of it the proxy on the sites' port (server/fleet_proxy.py), which passes only the Fleet
API. Flower 1.42 serves its unauthenticated Control and Runtime APIs on the SuperLink's port, so
that port must not be reachable from other machines. `fedpath-server stop` stops both by PID.

The admin commands (`run`, `status`, `resume`, `add-site`, `sites`...) drive Flower's own ``flwr``
CLI on this host against the loopback port, through a private ``FLWR_HOME`` in the state folder
whose one connection is this SuperLink, so nothing points at Flower's public servers. A remote
admin reaches that port through an SSH tunnel (docs/control-plane.md).
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from server.certificates import ConsortiumFiles
from server.fleet_proxy import UPSTREAM_NAME, Nginx, ProxyFiles, prepare_proxy, start_proxy
from server.pull_relay import bind_listener, relay_command
from server.relay_signals import bind_wake_port, write_wake_file
from server.server_config import LOOPBACK, ServerConfig
from shared.atomic_files import atomic_write_bytes
from shared.errors import UserError
from shared.processes import (
    executable,
    flower_env,
    port_open,
    running_pid,
    start,
    stop,
    stop_signals,
    wait_first_exit,
)

log = logging.getLogger("fedpath.server")

CONNECTION = "fedpath"
APP_DIR = Path(__file__).resolve().parents[1]
"""The repository root is the Flower app (pyproject.toml names server.app and client.app)."""

INSECURE_WARNING = ("WARNING: --insecure: TLS is OFF. Model updates and metrics cross the network in clear text "
                    "and any machine can join. Use this only on a test machine, never with patient data.")


class FlowerError(UserError):
    pass


class UnknownRun(FlowerError):
    """The SuperLink has no such run (e.g. it was started with another state database)."""


class StatePaths:
    def __init__(self, config: ServerConfig) -> None:
        self.dir = Path(config.superlink.state_dir)
        self.database = self.dir / "state.db"
        self.registry = self.dir / "sites.json"
        self.log = self.dir / "superlink.log"
        self.pid = self.dir / "superlink.pid"
        self.flwr_home = self.dir / "flwr"
        self.certs = ConsortiumFiles.in_folder(Path(config.superlink.certs_dir))
        self.proxy = ProxyFiles.in_state_dir(self.dir)
        self.relay_pid = self.dir / "pull_relay.pid"
        self.relay_log = self.dir / "pull_relay.log"
        self.relay_wake = self.dir / "pull_relay.wake"  # the relay's wake port, for the ServerApp's announcements

    def pid_files(self) -> list[tuple[str, Path]]:
        """The server's processes in the order they are stopped: the sites' door first."""
        return [("proxy", self.proxy.pid), ("pull relay", self.relay_pid), ("SuperLink", self.pid)]


def tls_files(config: ServerConfig, insecure: bool) -> ConsortiumFiles | None:
    """The certificate files, checked to exist; None with --insecure (after a loud warning)."""
    if insecure:
        print(INSECURE_WARNING, flush=True)
        log.warning(INSECURE_WARNING)
        return None
    files = StatePaths(config).certs
    missing = [str(p) for p in (files.ca_cert, files.server_cert, files.server_key) if not p.is_file()]
    if missing:
        raise FlowerError(f"TLS is on by default and these files are missing: {', '.join(missing)}. Make them with "
                          f"`fedpath-server init --name HOST --out {Path(config.superlink.certs_dir)}`, or pass "
                          "--insecure for a test without TLS.")
    return files


def superlink_command(config: ServerConfig, files: ConsortiumFiles | None) -> list[str]:
    """``flower-superlink`` on loopback only: its port also serves the Control and Runtime APIs."""
    paths = StatePaths(config)
    command = [executable("flower-superlink"), "--host", LOOPBACK, "--port", str(config.superlink.loopback),
               "--database", str(paths.database), "--log-file", str(paths.log),
               "--disable-runtime-dependency-installation"]
    if files is None:
        return [*command, "--insecure"]
    # Only hospitals registered with `fedpath-server add-site` may connect (Flower refuses
    # authentication without TLS, so --insecure turns both off). TLS stays on over loopback
    # for that reason; the proxy checks this certificate against the consortium CA.
    return [*command, "--ssl-ca-certfile", str(files.ca_cert), "--ssl-certfile", str(files.server_cert),
            "--ssl-keyfile", str(files.server_key), "--enable-supernode-auth"]


def superlink_env(paths: StatePaths) -> dict[str, str]:
    """Flower's environment without its switches for the legacy gRPC Control and Fleet servers:
    those would listen on 0.0.0.0 (ports 9093, 9092), past the proxy, with no login."""
    env = flower_env(paths.flwr_home)
    for name in [name for name in env if name.startswith("FLWR_INTERNAL_GRPC_")]:
        del env[name]
    return env


def start_server(config: ServerConfig, insecure: bool, detach: bool) -> int:
    """Start the SuperLink and its proxy; with ``detach`` return once both serve, else wait until
    one of them ends or Ctrl-C (or SIGTERM), and stop both."""
    paths = StatePaths(config)
    files = tls_files(config, insecure)
    keep_running = False
    with stop_signals() as signals:  # during start-up a signal interrupts at once: never one process alone
        nginx, relay = _preflight(config, paths, files)  # refused here, before the finally below
        try:
            processes = _start_all(config, paths, files, nginx, relay)
            signals.defer()  # from here a signal is a request, acted on between two polls of the wait
            superlink, pids = config.superlink, {name: process.pid for name, process in processes}
            print(f"SuperLink on {superlink.loopback_address} (pid {pids['the SuperLink']}; admin commands on this "
                  f"host only), log {paths.log}, state {paths.database}\n"
                  f"proxy on {superlink.address} for the sites, Fleet API only (nginx pid {pids['the proxy']}), "
                  f"log {paths.proxy.access_log}", flush=True)
            if relay is not None:
                print(f"pull relay on {LOOPBACK}:{relay.listener.getsockname()[1]} (pid {pids['the pull relay']}): "
                      f"holds a site's empty pull up to {superlink.pull_hold_s:g} s, log {paths.relay_log}", flush=True)
            if detach and not signals.received:
                print(f"stop them with `fedpath-server stop --config ...` (pid files "
                      f"{', '.join(str(pid_file) for _, pid_file in paths.pid_files())})")
                keep_running = True
                return 0
            name, code = wait_first_exit(processes, signals=signals)
            print(f"{name} exited with code {code}; stopping the others (logs: {paths.log}, "
                  f"{paths.proxy.error_log}, {paths.relay_log})", flush=True)
            return code if code >= 0 else 128 - code
        finally:
            signals.defer()  # the clean-up runs whole, whatever arrives meanwhile
            if relay is not None:
                relay.close()  # the relay holds its own copies
            if not keep_running:
                stopped = stop_server(paths)
                if stopped:
                    print(f"stopped: {', '.join(stopped)}", flush=True)


def _preflight(config: ServerConfig, paths: StatePaths,
               files: ConsortiumFiles | None) -> tuple[Nginx, RelaySockets | None]:
    """Refuse before anything starts: a second start, a port taken, a missing or refusing nginx.
    Binds the pull relay's two ports (free ones, chosen by the system) when the relay is on."""
    superlink = config.superlink
    paths.dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # state.db, logs: the server's user only
    _refuse_second_start(paths)
    for host, port, setting in ((superlink.host, superlink.port, "port"),
                                (LOOPBACK, superlink.loopback, "loopback_port")):
        if port_open(host, port):
            raise FlowerError(f"{host}:{port} is already in use by another program: stop it, or choose another "
                              f"superlink.{setting} in the server config")
    paths.relay_wake.unlink(missing_ok=True)  # a crashed start's: its port may be anyone's by now
    relay_sockets = RelaySockets.bind() if superlink.pull_hold_s > 0 else None
    try:
        relay_port = None if relay_sockets is None else relay_sockets.listener.getsockname()[1]
        return prepare_proxy(superlink, paths.proxy, files, relay_port), relay_sockets
    except BaseException:
        if relay_sockets is not None:
            relay_sockets.close()
        raise


@dataclass
class RelaySockets:
    """The pull relay's sockets, bound by the start command and inherited by the relay: the port nginx
    passes held pulls to, and the wake port the ServerApp announces its messages on."""

    listener: socket.socket
    wake: socket.socket

    @classmethod
    def bind(cls) -> RelaySockets:
        listener = bind_listener(LOOPBACK)
        try:
            return cls(listener, bind_wake_port())
        except BaseException:
            listener.close()
            raise

    def fds(self) -> tuple[int, int]:
        """The descriptors the relay process inherits."""
        return self.listener.fileno(), self.wake.fileno()

    def close(self) -> None:
        """The start command's copies (the relay keeps its own)."""
        self.listener.close()
        self.wake.close()


def _start_all(config: ServerConfig, paths: StatePaths, files: ConsortiumFiles | None, nginx: Nginx,
               relay: RelaySockets | None) -> list[tuple[str, subprocess.Popen]]:
    """The SuperLink, the pull relay, then the proxy in front of them; on any failure none is left running."""
    superlink = config.superlink
    processes = [("the SuperLink", start(superlink_command(config, files), paths.dir / "superlink.out", paths.pid,
                                         superlink_env(paths), "the SuperLink",
                                         ready_port=(LOOPBACK, superlink.loopback)))]
    try:
        if relay is not None:
            tls = None if files is None else (files.ca_cert, UPSTREAM_NAME)
            write_wake_file(paths.relay_wake, relay.wake)  # first: the relay reads its token there
            command = relay_command(relay.listener, (LOOPBACK, superlink.loopback), tls, superlink.pull_hold_s,
                                    superlink.max_request_mb, None if files is None else paths.registry,
                                    (relay.wake, paths.relay_wake))
            processes.append(("the pull relay", start(command, paths.relay_log, paths.relay_pid,
                                                      flower_env(), "the pull relay", pass_fds=relay.fds())))
        processes.append(("the proxy", start_proxy(superlink, paths.proxy, files, nginx)))
        return processes
    except BaseException:
        stop_server(paths)
        raise


def stop_server(paths: StatePaths) -> list[str]:
    """Stop the proxy first (the sites are cut off at once), then the relay and the SuperLink; what was stopped."""
    stopped = []
    for what, pid_file in paths.pid_files():
        pid = stop(pid_file)
        if pid is not None:
            stopped.append(f"{what} (pid {pid})")
    paths.relay_wake.unlink(missing_ok=True)  # its port is free again: announce to nobody
    return stopped


def _refuse_second_start(paths: StatePaths) -> None:
    running = [f"the {what} (pid {pid}, {pid_file})" for what, pid_file in paths.pid_files()
               if (pid := running_pid(pid_file)) is not None]
    if running:
        raise FlowerError(f"already running: {', '.join(running)}; `fedpath-server stop --config ...` first")


class FlowerControl:
    """`flwr` commands against this consortium's SuperLink, on its loopback port."""

    def __init__(self, config: ServerConfig, insecure: bool) -> None:
        self.paths = StatePaths(config)
        # The SuperLink itself, never the sites' port: the proxy passes only the Fleet API.
        address = config.superlink.loopback_address
        self.paths.dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # as `start` makes it: the server's user only
        self.paths.flwr_home.mkdir(parents=True, exist_ok=True)
        security = "insecure = true" if insecure else f'root-certificates = "{self.paths.certs.ca_cert}"'
        settings = (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n'
                    f'{security}\n').encode()
        toml = self.paths.flwr_home / "config.toml"
        # Every admin command makes one, while the dashboard's and others' `flwr` may be reading the file:
        # replaced whole and only when it changes, never seen half written.
        if not toml.is_file() or toml.read_bytes() != settings:
            atomic_write_bytes(toml, settings)
        self.env = flower_env(self.paths.flwr_home)

    def submit(self, run_dir: Path) -> int:
        from server.app import RUN_DIR_KEY

        return self.submit_app(f"{RUN_DIR_KEY}='{run_dir}'")

    def submit_app(self, run_config: str, *options: str) -> int:
        """`flwr run` of fedpath's app with this run config (and further ``flwr run`` options); the run id."""
        if not (APP_DIR / "pyproject.toml").is_file():
            raise FlowerError(f"{APP_DIR} holds no pyproject.toml: install fedpath from its repository "
                              "(`pip install -e .`) so the app can be sent to the SuperLink")
        from shared.app_bundle import stage_app

        # `flwr run` walks every file under the folder it is given (a .venv inside the repository: some
        # 50,000, 4 s of CPU); a copy of the app's own files builds the same bundle (shared/app_bundle.py).
        with tempfile.TemporaryDirectory(prefix="app-", dir=self.paths.dir) as staged:
            app = stage_app(APP_DIR, Path(staged) / APP_DIR.name)
            out = self._json(["run", str(app), CONNECTION, "--run-config", run_config, *options])
        return int(out["run-id"])

    def runs(self) -> list[dict]:
        return self._json(["ls"]).get("runs", [])

    def run(self, run_id: int) -> dict:
        runs = self._json(["ls", "--run-id", str(run_id)]).get("runs", [])
        if not runs:
            raise UnknownRun(f"the SuperLink knows no run {run_id}")
        return runs[0]

    def nodes(self) -> list[dict]:
        return self._json(["supernode", "ls"]).get("nodes", [])

    def register(self, public_key_file: Path, name: str) -> int:
        """Register a hospital's public key at the SuperLink; the node id it will always have."""
        out = self._json(["supernode", "register", str(public_key_file), CONNECTION, "--name", name])
        return int(out["node-id"])

    def unregister(self, node_id: int) -> None:
        self._json(["supernode", "unregister", str(node_id), CONNECTION])

    def logs(self, run_id: int) -> str:
        return self._call(["log", str(run_id), CONNECTION, "--show"], timeout=60).stdout

    def stop_run(self, run_id: int) -> None:
        self._call(["stop", str(run_id), CONNECTION], timeout=60)

    def _json(self, args: list[str]) -> dict:
        args = [*args, *([] if CONNECTION in args else [CONNECTION]), "--format", "json"]
        result = self._call(args, timeout=120)
        try:
            document = json.loads(result.stdout[result.stdout.find("{"):])
        except ValueError:
            raise FlowerError(f"`flwr {' '.join(args)}` gave no JSON: {result.stdout.strip()[-500:]} "
                              f"{result.stderr.strip()[-500:]}") from None
        if not document.get("success", True):
            raise FlowerError(f"`flwr {args[0]}` failed: {document.get('error-message', document)}")
        return document

    def _call(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([executable("flwr"), *args], capture_output=True, text=True, env=self.env,
                                  timeout=timeout, cwd=self.paths.dir)
        except subprocess.TimeoutExpired:
            raise FlowerError(f"`flwr {' '.join(args)}` did not answer within {timeout:g} s: is the SuperLink "
                              f"running on this host? (log: {self.paths.log})") from None
