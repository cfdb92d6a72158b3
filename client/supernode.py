"""`fedpath-site start`: this hospital's SuperNode, the one process that talks to the consortium.

It connects out to the SuperLink (TLS with the consortium's CA unless ``--insecure``), keeps
retrying while the server is down or restarting, and starts the ClientApp for each message
with this site's site.yaml in its node config. Nothing is installed at run time.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from client.app import SITE_CONFIG_KEY
from client.site_config import SiteConfig
from shared.errors import UserError
from shared.processes import executable, flower_env, running_pid, start

log = logging.getLogger("fedpath.site")

INSECURE_WARNING = ("WARNING: --insecure: TLS is OFF. This site's model updates cross the network in clear text "
                    "and it cannot tell the real server from an impostor. Test machines only.")


class SiteStartError(UserError):
    pass


def supernode_command(config: SiteConfig, site_yaml: Path, insecure: bool) -> list[str]:
    federation = config.federation
    if not federation.server:
        raise SiteStartError(f"{site_yaml}: federation.server is not set; put the host:port the consortium "
                             "admin gave you there")
    command = [executable("flower-supernode"), "--superlink", federation.server, "--port", str(federation.port),
               "--node-config", f"{SITE_CONFIG_KEY}='{Path(site_yaml).resolve()}'"]
    if insecure:
        print(INSECURE_WARNING, flush=True)
        log.warning(INSECURE_WARNING)
        return [*command, "--insecure"]
    if federation.ca_cert is None or not Path(federation.ca_cert).is_file():
        raise SiteStartError(f"{site_yaml}: federation.ca_cert "
                             f"{'is not set' if federation.ca_cert is None else f'({federation.ca_cert}) is missing'}"
                             ": TLS needs the consortium's ca.pem from the admin (or --insecure on a test machine)")
    key = Path(federation.auth_key)
    if not key.is_file():
        raise SiteStartError(f"{site_yaml}: this site's private key {key} is missing: make it with `fedpath-site keygen "
                             "--config site.yaml` and send the .pub file to the consortium admin to register")
    return [*command, "--root-certificates", str(federation.ca_cert), "--auth-supernode-private-key", str(key)]


RETRY_MAX_S = 60.0
STABLE_S = 300.0  # a SuperNode that ran this long was connected: back off from the start again


def start_supernode(config: SiteConfig, site_yaml: Path, insecure: bool, detach: bool) -> int:
    """Run the SuperNode under a small supervisor that restarts it when the SuperLink refuses or
    drops it: right after a crash the SuperLink still holds the old session (for about a
    minute) and refuses the same key; a restart a little later is accepted."""
    state = Path(config.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    command = supernode_command(config, site_yaml, insecure)  # config errors surface here, in the foreground
    pid_file, log_file = state / "supernode.pid", state / "supernode.log"
    if detach:
        supervisor = [sys.executable, "-m", "client.supernode", str(Path(site_yaml).resolve()),
                      *(["--insecure"] if insecure else [])]
        process = start(supervisor, log_file, pid_file, flower_env(state / "flwr"), f"the SuperNode of {config.name}",
                        ready_port=("127.0.0.1", config.federation.port))
        print(f"{config.name}: SuperNode started (pid {process.pid}), connecting to {config.federation.server}; "
              f"log {log_file}", flush=True)
        return 0
    pid = running_pid(pid_file)
    if pid is not None and pid != os.getpid():
        raise SiteStartError(f"the SuperNode of {config.name} is already running (pid {pid}, {pid_file})")
    pid_file.write_text(f"{os.getpid()}\n")
    try:
        return supervise(command, flower_env(state / "flwr"), log_file, config.name)
    finally:
        pid_file.unlink(missing_ok=True)


def supervise(command: list[str], env: dict[str, str], log_file: Path, name: str) -> int:
    delay = 2.0
    while True:
        started = time.monotonic()
        with open(log_file, "ab") as log_handle:
            process = subprocess.Popen(command, stdout=log_handle, stderr=subprocess.STDOUT, env=env)
        try:
            code = process.wait()
        except KeyboardInterrupt:
            process.terminate()
            process.wait(timeout=30)
            return 130
        if code == 0:
            return 0
        if time.monotonic() - started > STABLE_S:
            delay = 2.0
        print(f"{time.strftime('%H:%M:%S')} {name}: the SuperNode exited with code {code}: the SuperLink refused or "
              "dropped it (a key that is not registered or was revoked, a ca_cert that is not the consortium's, or a "
              f"session still open from before a crash). Retrying in {delay:.0f} s; see {log_file}", flush=True)
        time.sleep(delay)
        delay = min(2 * delay, RETRY_MAX_S)


def main(argv: list[str] | None = None) -> int:
    """``python -m client.supernode SITE_YAML [--insecure]``: the detached supervisor."""
    from client.site_config import load_site_config

    args = sys.argv[1:] if argv is None else argv
    site_yaml = Path(args[0])
    return start_supernode(load_site_config(site_yaml), site_yaml, insecure="--insecure" in args, detach=False)


if __name__ == "__main__":
    sys.exit(main())
