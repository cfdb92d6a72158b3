"""The consortium's SuperLink process and the `flwr` control commands that talk to it.

`fedpath-server start` runs ``flower-superlink`` with a SQLite state database (runs and
registered sites survive a restart), a log file, no run-time package installation, and TLS
unless ``--insecure``. The admin commands (`run`, `status`, `resume`) drive Flower's own
``flwr`` CLI through a private ``FLWR_HOME`` in the state folder, whose one connection is
this SuperLink, so nothing points at Flower's public servers.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

from server.certificates import ConsortiumFiles
from server.server_config import ServerConfig
from shared.errors import UserError
from shared.processes import executable, flower_env, start

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


def superlink_command(config: ServerConfig, insecure: bool) -> list[str]:
    paths = StatePaths(config)
    command = [executable("flower-superlink"), "--host", config.superlink.host, "--port", str(config.superlink.port),
               "--database", str(paths.database), "--log-file", str(paths.log),
               "--disable-runtime-dependency-installation"]
    files = tls_files(config, insecure)
    if files is None:
        return [*command, "--insecure"]
    # Only hospitals registered with `fedpath-server add-site` may connect (Flower refuses
    # authentication without TLS, so --insecure turns both off).
    return [*command, "--ssl-ca-certfile", str(files.ca_cert), "--ssl-certfile", str(files.server_cert),
            "--ssl-keyfile", str(files.server_key), "--enable-supernode-auth"]


def start_superlink(config: ServerConfig, insecure: bool, detach: bool) -> int:
    """Start the SuperLink; with ``detach`` return once it listens, else wait for it (Ctrl-C stops it)."""
    paths = StatePaths(config)
    paths.dir.mkdir(parents=True, exist_ok=True)
    command = superlink_command(config, insecure)
    env = flower_env(paths.flwr_home)
    host = "127.0.0.1" if config.superlink.host in ("0.0.0.0", "") else config.superlink.host
    process = start(command, paths.dir / "superlink.out", paths.pid, env, "the SuperLink",
                    ready_port=(host, config.superlink.port))
    print(f"SuperLink listening on {config.superlink.address} (pid {process.pid}); log {paths.log}, "
          f"state {paths.database}", flush=True)
    if detach:
        print(f"stop it with `fedpath-server stop --config ...` (pid file {paths.pid})")
        return 0
    try:
        return process.wait()
    finally:
        if process.poll() is None:
            from shared.processes import stop_pid
            stop_pid(process.pid)
        paths.pid.unlink(missing_ok=True)


class FlowerControl:
    """`flwr` commands against this consortium's SuperLink."""

    def __init__(self, config: ServerConfig, insecure: bool) -> None:
        self.paths = StatePaths(config)
        address = config.superlink.public_address or \
            f"{'127.0.0.1' if config.superlink.host in ('0.0.0.0', '') else config.superlink.host}:{config.superlink.port}"
        self.paths.flwr_home.mkdir(parents=True, exist_ok=True)
        security = "insecure = true" if insecure else f'root-certificates = "{self.paths.certs.ca_cert}"'
        (self.paths.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{security}\n')
        self.env = flower_env(self.paths.flwr_home)

    def submit(self, run_dir: Path) -> int:
        from server.app import RUN_DIR_KEY

        if not (APP_DIR / "pyproject.toml").is_file():
            raise FlowerError(f"{APP_DIR} holds no pyproject.toml: install fedpath from its repository "
                              "(`pip install -e .`) so the app can be sent to the SuperLink")
        out = self._json(["run", str(APP_DIR), CONNECTION, "--run-config", f"{RUN_DIR_KEY}='{run_dir}'"])
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
                              f"running? (log: {self.paths.log})") from None
