"""`fedpath-server add-site / remove-site / sites`: which hospitals may join.

A hospital makes its own key pair (`fedpath-site keygen`; the private key never leaves it) and
sends the admin the public key. Registering it at the SuperLink is what lets that SuperNode
connect; removing it cuts the node off at once, mid-run included.
"""

from __future__ import annotations

from pathlib import Path

from server.server_config import ServerConfig
from server.site_registry import SiteRegistry
from server.superlink import FlowerControl, FlowerError, StatePaths
from shared.site_keys import fingerprint, read_public_key


def add_site(config: ServerConfig, control: FlowerControl, name: str, public_key_file: Path) -> str:
    """Register ``name``'s key; returns what the admin hands the hospital."""
    key = read_public_key(public_key_file)
    registry = SiteRegistry(StatePaths(config).registry)
    registry.check_new(name, key)
    node_id = control.register(Path(public_key_file), name)
    registry.add(name, node_id, key, fingerprint(key))
    address = config.superlink.public_address or config.superlink.address
    return (f"registered {name} as node {node_id} (key {fingerprint(key)}).\n"
            f"Give {name}: the CA certificate {StatePaths(config).certs.ca_cert} and the address {address}\n"
            "(site.yaml: federation.server and federation.ca_cert). Compare the key fingerprint with the "
            "hospital by phone before the first run.")


def remove_site(config: ServerConfig, control: FlowerControl, name: str) -> int:
    entry = SiteRegistry(StatePaths(config).registry).remove(name)
    try:
        control.unregister(entry["node_id"])
    except FlowerError as exc:
        if "not found" not in str(exc).lower():
            raise
    return int(entry["node_id"])


def sites_table(config: ServerConfig, control: FlowerControl) -> str:
    entries = SiteRegistry(StatePaths(config).registry).entries()
    try:
        online = {int(n["node-id"]) for n in control.nodes() if n.get("status") == "online"}
    except FlowerError:
        online = set()
    if not entries:
        return "no sites registered; `fedpath-server add-site NAME SITE.pub --config server.yaml`"
    lines = [f"{'site':<20} {'node id':<22} {'online':<7} {'key fingerprint':<52} registered"]
    for name, entry in sorted(entries.items()):
        lines.append(f"{name:<20} {entry['node_id']:<22} {'yes' if entry['node_id'] in online else 'no':<7} "
                     f"{entry['fingerprint']:<52} {entry['registered']}")
    return "\n".join(lines)
