"""`fedpath-site start`: this hospital's SuperNode, the one process that talks to the consortium.

It connects out to the SuperLink (TLS with the consortium's CA unless ``--insecure``), keeps
retrying while the server is down or restarting, and starts the ClientApp for each message
with this site's site.yaml in its node config. Nothing is installed at run time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from client.app import SITE_CONFIG_KEY
from client.site_config import SiteConfig
from shared.errors import UserError
from shared.processes import executable, flower_env, start, stop_pid

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


def start_supernode(config: SiteConfig, site_yaml: Path, insecure: bool, detach: bool) -> int:
    state = Path(config.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    process = start(supernode_command(config, site_yaml, insecure), state / "supernode.log", state / "supernode.pid",
                    flower_env(state / "flwr"), f"the SuperNode of {config.name}",
                    ready_port=("127.0.0.1", config.federation.port))
    print(f"{config.name}: SuperNode started (pid {process.pid}), connecting to {config.federation.server}; "
          f"log {state / 'supernode.log'}", flush=True)
    if detach:
        return 0
    try:
        code = process.wait()
        if code:
            print(f"{config.name}: the SuperNode exited with code {code}. The SuperLink refused it or could not be "
                  "reached: is this site's key registered (`fedpath-server sites` at the admin), is ca_cert the "
                  f"consortium's, is {config.federation.server} right? See {state / 'supernode.log'}")
        return code
    except KeyboardInterrupt:
        return 130
    finally:
        if process.poll() is None:
            stop_pid(process.pid)
        (state / "supernode.pid").unlink(missing_ok=True)
