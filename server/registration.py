"""`fedpath-server add-site / remove-site / sites`: which hospitals may join.

A hospital makes its own key pair (`fedpath-site keygen`; the private key never leaves it) and
sends the admin the public key. Registering it at the SuperLink is what lets that SuperNode
connect; removing it cuts the node off at once, mid-run included.

`sites` starts from what the SuperLink knows, not from the registry: a key registered at the
SuperLink by any other way (``flwr supernode register`` on the loopback port, an old state.db)
can connect like a hospital, so every node the registry does not name is flagged, and so is a
registered site the SuperLink does not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server.server_config import ServerConfig
from server.site_registry import SiteRegistry
from server.superlink import FlowerControl, FlowerError, StatePaths
from shared.processes import WILDCARD_HOSTS
from shared.site_keys import fingerprint, read_public_key

UNKNOWN = "UNKNOWN — not in the consortium registry"
MISSING = "MISSING — registered here, unknown to the SuperLink"
REVOKED = "unregistered"  # Flower's status of a removed key: it can no longer connect


def add_site(config: ServerConfig, control: FlowerControl, name: str, public_key_file: Path) -> str:
    """Register ``name``'s key; returns what the admin hands the hospital."""
    key = read_public_key(public_key_file)
    registry = SiteRegistry(StatePaths(config).registry)
    registry.check_new(name, key)
    node_id = control.register(Path(public_key_file), name)
    registry.add(name, node_id, key, fingerprint(key))
    superlink = config.superlink
    address = superlink.public_address or (f"<this server's host name>:{superlink.port} (set superlink.public_address "
                                           "to print it here)" if superlink.host in WILDCARD_HOSTS
                                           else superlink.address)
    return (f"registered {name} as node {node_id} (key {fingerprint(key)}).\n"
            f"Give {name}: the CA certificate {StatePaths(config).certs.ca_cert} and the address {address}\n"
            "(site.yaml: federation.server and federation.ca_cert). Compare the key fingerprint with the "
            "hospital by phone before the first run.")


def remove_site(config: ServerConfig, control: FlowerControl, name: str) -> int:
    """Cut ``name``'s SuperNode off at the SuperLink, then drop it from the registry; its node id.

    In this order: a SuperLink that cannot unregister the key (down, slow, its connection settings
    unreadable) leaves the registry as it was, so the still valid key stays named and the admin can
    run the command again; the other order lost the node id while the key still connected. Flower's
    own "Node ID not found" (code 24: removed already; the request names only this node) counts as done.
    """
    registry = SiteRegistry(StatePaths(config).registry)
    node_id = int(registry.entry(name)["node_id"])
    try:
        control.unregister(node_id)
    except FlowerError as exc:
        if "node id not found" not in str(exc).lower():  # Flower's words for this node removed already
            raise FlowerError(f"{name} (node {node_id}) is still registered: the SuperLink did not unregister "
                              f"its key ({exc}); nothing was changed, run remove-site again") from None
    registry.remove(name)
    return node_id


@dataclass(frozen=True)
class SiteRow:
    """One node the SuperLink knows, or one registered site it does not."""

    name: str  # the registered name, or "UNKNOWN"
    node_id: int
    status: str  # Flower's: online, offline, unregistered; "-" when the SuperLink does not know it
    fingerprint: str
    registered: str
    flag: str = ""  # UNKNOWN or MISSING (see above), "" when all is well


def site_rows(config: ServerConfig, control: FlowerControl) -> tuple[list[SiteRow], int]:
    """Every node the SuperLink knows (removed keys counted, not listed) beside the registry, and how
    many removed keys were left out. Raises FlowerError when the SuperLink cannot be asked."""
    paths = StatePaths(config)
    entries = SiteRegistry(paths.registry).entries()
    try:
        nodes = {int(n["node-id"]): n for n in control.nodes()}
    except FlowerError as exc:
        raise FlowerError(f"cannot list the SuperLink's nodes ({exc}); {len(entries)} site(s) in {paths.registry}") \
            from None
    by_node = {int(entry["node_id"]): name for name, entry in entries.items()}
    revoked = {node_id for node_id, node in nodes.items() if node.get("status") == REVOKED}
    rows = []
    for node_id, node in sorted(nodes.items()):
        if node_id in revoked and node_id not in by_node:
            continue
        name = by_node.get(node_id)
        if name is None:
            rows.append(SiteRow("UNKNOWN", node_id, node.get("status", "?"), "-", str(node.get("created-at") or "-"),
                                UNKNOWN))
            continue
        entry = entries[name]
        rows.append(SiteRow(name, node_id, node.get("status", "?"), entry["fingerprint"], entry["registered"],
                            MISSING if node_id in revoked else ""))
    for name, entry in sorted(entries.items()):
        if int(entry["node_id"]) not in nodes:
            rows.append(SiteRow(name, int(entry["node_id"]), "-", entry["fingerprint"], entry["registered"], MISSING))
    return rows, len(revoked - set(by_node))


def sites_table(config: ServerConfig, control: FlowerControl) -> tuple[str, int]:
    """``site_rows`` as the `sites` command prints it, and how many lines are flagged (unknown nodes,
    registered sites the SuperLink lacks)."""
    paths = StatePaths(config)
    rows, removed = site_rows(config, control)
    if not rows:
        return "no sites registered; `fedpath-server add-site NAME SITE.pub --config server.yaml`", 0
    lines = [f"{'site':<20} {'node id':<22} {'status':<10} {'key fingerprint':<52} {'registered':<25} flag"]
    lines += [f"{r.name:<20} {r.node_id:<22} {r.status:<10} {r.fingerprint:<52} {r.registered:<25} {r.flag}".rstrip()
              for r in rows]
    flagged = [row for row in rows if row.flag]
    if removed:
        lines.append(f"({removed} removed key(s) not shown: they can no longer connect)")
    if any(row.flag == UNKNOWN for row in flagged):
        lines.append(f"\n{UNKNOWN}: a key registered at the SuperLink by some other way than `fedpath-server "
                     "add-site`; it can connect and train like a hospital. Find out whose it is; revoke it with "
                     f"`FLWR_HOME={paths.flwr_home} flwr supernode unregister NODE_ID fedpath` on this host.")
    if any(row.flag == MISSING for row in flagged):
        lines.append(f"\n{MISSING}: {paths.registry} names it, but the SuperLink does not (another state.db, or "
                     "the key was unregistered directly): `fedpath-server remove-site NAME --config SERVER_YAML`, "
                     "then `add-site` again.")
    return "\n".join(lines), len(flagged)
