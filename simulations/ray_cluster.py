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
first remote node, after minutes of start-up; ``check_nodes`` runs one small task on every alive node
first and names each node and each path it cannot use. Without shared storage, ``data: travel`` sends
each hospital's files with its tasks instead (``simulations/site_travel.py``); the nodes then only need
fedpath and a writable temporary directory.

``auto`` is resolved once, here, to the cluster's own address, which the SuperLink's simulation is
given: the pre-flight check and the run reach the same cluster even if another one starts meanwhile.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from client.app import SIMULATION_TRAVEL_KEY
from client.site_config import load_site_config
from shared.errors import UserError
from simulations.site_travel import (
    STORE_NAME,
    SiteStore,
    pack_folder,
    pack_inputs,
    remove_local,
    write_back,
)

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
    temp_writable: bool = True  # data: travel keeps the hospitals' copies in the node's temporary directory

    def problems(self) -> list[str]:
        found = [f"cannot read {path}" for path in self.unreadable]
        found += [f"cannot write in {path}" for path in self.unwritable]
        if not self.fedpath:
            found.append("cannot import fedpath's ClientApp (client.app): install fedpath there at the same path")
        if not self.temp_writable:
            found.append("cannot write in its temporary directory, where data: travel puts the hospitals' copies")
        return found


@dataclass(frozen=True)
class ClusterRun:
    """A simulation's hold on the cluster while it runs."""

    address: str  # the cluster joined (``auto`` resolved)
    nodes: tuple[NodeView, ...]
    env: dict[str, str] = field(default_factory=dict)  # for the SuperLink (Flower's simulation inherits it)
    run_config: dict[str, str] = field(default_factory=dict)  # for the ClientApps (data: travel)


def probe(read: Sequence[str], write: Sequence[str]) -> dict:
    """Runs on a Ray node: which of the paths this node cannot read or write, and whether it has fedpath
    and a temporary directory it can write in."""
    temp = tempfile.gettempdir()
    return {"host": socket.gethostname(),
            "unreadable": [p for p in read if not os.access(p, os.R_OK)],
            "unwritable": [p for p in write if not os.access(p, os.W_OK | os.X_OK)],
            "fedpath": importlib.util.find_spec("client.app") is not None,
            "temp_writable": os.access(temp, os.W_OK | os.X_OK)}


@contextmanager
def joined(address: str) -> Iterator[str]:
    """This process as a driver of the cluster at ``address``; yields the address joined (``auto``
    resolved to the cluster's own, ``ray://`` kept). Leaves the cluster on exit."""
    import ray

    try:  # the same runtime environment Flower's RayBackend gives its workers
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}})
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, ValueError, RuntimeError...
        raise ClusterError(f"simulation.backend.address {address!r}: could not join the Ray cluster: {exc}") from None
    try:
        yield address if address.startswith("ray://") else ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def on_every_node(function: Callable, *args, timeout: float = PROBE_TIMEOUT_S) -> tuple[dict[str, object], list[str]]:
    """Run ``function(*args)`` once on every alive node of the joined cluster: (node name -> result,
    one line per node where it did not run)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(function)
    pending = {f"{node['NodeManagerAddress']} ({node['NodeID'][:8]})": remote.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(*args)
        for node in ray.nodes() if node.get("Alive")}
    ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=timeout)
    results, failures = {}, []
    for name, ref in pending.items():
        if ref not in ready:
            failures.append(f"{name}: did not run fedpath's task within {timeout:.0f} s (no free worker there?)")
            continue
        try:
            results[name] = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a node without fedpath cannot even unpickle the function
            failures.append(f"{name}: could not run fedpath's task there ({type(exc).__name__}): install "
                            f"fedpath at the same path on every node")
    return results, failures


def check_nodes(address: str, read: Sequence[Path], write: Sequence[Path], travel: bool = False,
                timeout: float = PROBE_TIMEOUT_S) -> list[NodeView]:
    """Run ``probe`` once on every alive node of the joined cluster.

    Args:
        address: the address as configured (for the messages).
        read: files and folders every ClientApp reads (site.yaml files, feature caches, the trunk).
        write: folders the ClientApps write in (each virtual hospital's folder: its ledger, its node id).
        travel: the hospitals travel with their tasks (``read`` and ``write`` are then empty): each node
            needs a writable temporary directory instead.
        timeout: seconds for all nodes together.

    Returns:
        What each node sees. Raises ClusterError with every node and every path it cannot use when one
        cannot.
    """
    seen, failures = on_every_node(probe, [str(p) for p in read], [str(p) for p in write], timeout=timeout)
    views = []
    for name, found in seen.items():
        view = NodeView(f"{name} {found['host']}", tuple(found["unreadable"]), tuple(found["unwritable"]),
                        found["fedpath"], found["temp_writable"] or not travel)
        views.append(view)
        failures += [f"{view.node}: {problem}" for problem in view.problems()]
    if failures:
        need = ("fedpath installed at the same path and a writable temporary directory" if travel else
                "the simulation's folders at the same path (shared storage, or data: travel) and fedpath installed")
        raise ClusterError(f"the Ray cluster at {address!r} cannot run these virtual hospitals: every node must "
                           f"have {need}:\n  " + "\n  ".join(failures))
    return views


def check_cluster(address: str, read: Sequence[Path], write: Sequence[Path],
                  timeout: float = PROBE_TIMEOUT_S) -> list[NodeView]:
    """Join the cluster at ``address``, ``check_nodes`` and leave (``auto``, ``ray://HOST:PORT`` or
    ``HOST:PORT``, as ``simulation.backend.address``)."""
    with joined(address):
        return check_nodes(address, read, write, timeout=timeout)


@contextmanager
def cluster_run(address: str, site_yamls: dict[str, Path], read: Sequence[Path], write: Sequence[Path],
                travel: bool = False, node_id_file: str = "node-id") -> Iterator[ClusterRun]:
    """Hold the cluster for one simulation: join, check every node, and with ``travel`` keep the
    hospitals in a ``SiteStore`` actor until the run ends, then write their state back and remove
    their copies from every node (also when the run failed: the ledgers must not be lost).

    Args:
        address: ``simulation.backend.address``.
        site_yamls: virtual hospital name (``site-001``...) -> its site.yaml.
        read, write: what the nodes must reach with shared storage (``sim_runner.cluster_paths``).
        travel: ``simulation.backend.data == "travel"``.
        node_id_file: the file beside each site.yaml that names the hospital's node id.
    """
    import ray

    with joined(address) as resolved:
        nodes = check_nodes(address, [] if travel else read, [] if travel else write, travel=travel)
        env = {"RAY_ADDRESS": resolved}
        if not travel:
            yield ClusterRun(resolved, tuple(nodes), env)
            return
        namespace = f"fedpath-{uuid.uuid4().hex[:12]}"
        inputs = {site: pack_inputs(path) for site, path in site_yamls.items()}
        states = {site: pack_folder(load_site_config(path).state_dir) for site, path in site_yamls.items()}
        store = ray.remote(num_cpus=0, max_restarts=0)(SiteStore).options(
            name=STORE_NAME, namespace=namespace).remote(inputs, states)
        # The store is up before the first round (asking for a site's inputs would copy them here for nothing).
        ray.get(store.sites.remote())
        print(f"data: travel: {len(inputs)} virtual hospitals, {sum(map(len, inputs.values())) / 2**20:.1f} MiB "
              f"in Ray namespace {namespace}", flush=True)
        try:
            yield ClusterRun(resolved, tuple(nodes), env, {SIMULATION_TRAVEL_KEY: namespace})
        finally:
            try:
                write_back(ray.get(store.returned.remote()), site_yamls, node_id_file)
            finally:  # the copies go even when the state could not be brought back (the error says why)
                _, failed = on_every_node(remove_local, namespace)
                if failed:
                    print(f"could not remove the hospitals' copies (TMP/fedpath-travel/{namespace}) on: "
                          + "; ".join(failed), flush=True)
