"""A simulation on a Ray cluster that already runs (``simulation.backend.address``), and the check that
every node of it can reach the virtual hospitals before the first round.

Flower's simulation configuration has no address: the ``ray.init()`` inside Flower's simulation
process joins the cluster that ``RAY_ADDRESS`` names, so ``fedpath-sim run`` puts the address in the
environment of the SuperLink it starts (Flower's simulation process inherits it). Joining a cluster,
``ray.init`` refuses resource arguments such as ``num_cpus`` (the cluster has its own), so the config
refuses ``backend.cpus`` together with an address instead of passing it.

A virtual hospital's ClientApp reads its site.yaml, its feature cache and the trunk by path, and writes
its privacy ledger beside them. On a real cluster the ClientApps run on other machines, so those paths
must sit on storage every node mounts at the same place, with fedpath installed at the same path as
here (Flower hands the workers this process's ``sys.path``). Without that, round 1 would fail on the
first remote node, after minutes of start-up; ``check_cluster`` runs one small task on every alive node
first and names each node and each path it cannot use.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.errors import UserError

PROBE_TIMEOUT_S = 120.0  # for every node to run the probe (a busy cluster queues it)


class ClusterError(UserError):
    pass


@dataclass(frozen=True)
class NodeView:
    """What one Ray node sees of the simulation's files."""

    node: str  # the node's address and host name
    unreadable: tuple[str, ...] = ()
    unwritable: tuple[str, ...] = ()
    fedpath: bool = True  # fedpath's ClientApp can be imported there

    def problems(self) -> list[str]:
        found = [f"cannot read {path}" for path in self.unreadable]
        found += [f"cannot write in {path}" for path in self.unwritable]
        if not self.fedpath:
            found.append("cannot import fedpath's ClientApp (client.app): install fedpath there at the same path")
        return found


def cluster_env(address: str) -> dict[str, str]:
    """What the SuperLink's environment needs so that Flower's simulation joins the cluster."""
    return {"RAY_ADDRESS": address}


def probe(read: Sequence[str], write: Sequence[str]) -> dict:
    """Runs on a Ray node: which of the paths this node cannot read or write, and whether it has fedpath."""
    return {"host": socket.gethostname(),
            "unreadable": [p for p in read if not os.access(p, os.R_OK)],
            "unwritable": [p for p in write if not os.access(p, os.W_OK | os.X_OK)],
            "fedpath": importlib.util.find_spec("client.app") is not None}


def check_cluster(address: str, read: Sequence[Path], write: Sequence[Path],
                  timeout: float = PROBE_TIMEOUT_S) -> list[NodeView]:
    """Join the cluster at ``address`` and run ``probe`` once on every alive node.

    Args:
        address: ``auto``, ``ray://HOST:PORT`` or ``HOST:PORT`` (``simulation.backend.address``).
        read: files and folders every ClientApp reads (site.yaml files, feature caches, the trunk).
        write: folders the ClientApps write in (each virtual hospital's folder: its ledger, its node id).
        timeout: seconds for all nodes together.

    Returns:
        What each node sees. Raises ClusterError naming the address when the cluster cannot be joined,
        and every node with every path it cannot use when one cannot.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    read_paths, write_paths = [str(p) for p in read], [str(p) for p in write]
    try:  # the same runtime environment Flower's RayBackend gives its workers
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, ValueError, RuntimeError...
        raise ClusterError(f"simulation.backend.address {address!r}: could not join the Ray cluster: {exc}") from None
    try:
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        remote = ray.remote(num_cpus=0, max_retries=0)(probe)
        pending = {f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})": remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(read_paths,
                                                                                                 write_paths)
            for node in nodes}
        ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=timeout)
        views, failures = [], []
        for name, ref in pending.items():
            if ref not in ready:
                failures.append(f"{name}: did not run the check within {timeout:.0f} s (no free worker there?)")
                continue
            try:
                seen = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a node without fedpath cannot even unpickle the probe
                failures.append(f"{name}: could not run fedpath's check there ({type(exc).__name__}): install "
                                f"fedpath at the same path on every node")
                continue
            view = NodeView(f"{name} {seen['host']}", tuple(seen["unreadable"]), tuple(seen["unwritable"]),
                            seen["fedpath"])
            views.append(view)
            failures += [f"{view.node}: {problem}" for problem in view.problems()]
    finally:
        ray.shutdown()
    if failures:
        raise ClusterError(
            f"the Ray cluster at {address!r} cannot run these virtual hospitals: every node must see the "
            f"simulation's folders at the same path (shared storage) and have fedpath installed:\n  "
            + "\n  ".join(failures))
    return views
