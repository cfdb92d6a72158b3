"""`fedpath-sim run`: the consortium's ServerApp and ClientApp on Flower's Simulation Engine (Ray).

The run is a deployed run in every respect but transport: a SuperLink of its own (in simulation
mode, on free ports, with a private FLWR_HOME), the same app bundle submitted with ``flwr run``,
the same run folder (``RunFolder.create`` on a server.yaml written from sim.yaml), the same
ClientApp, which finds virtual hospital ``i``'s site.yaml from Flower's partition id. Afterwards
the best checkpoint is scored on the held-out test patients (``test_metrics.json``). The
SuperLink and everything it started (the simulation process, Ray) are stopped by PID, also on
error or Ctrl-C. With ``simulation.backend.address`` the ClientApps run on a Ray cluster that already
runs instead (``simulations/ray_cluster.py``); fedpath neither starts nor stops that cluster.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import yaml

from client.app import SIMULATED_NODE_ID_FILE, SIMULATION_SITES_KEY
from client.feature_cache import FeatureCache
from client.sequence_data import SlideFeatures, load_split
from client.site_config import BUILTIN_WEIGHTS, load_site_config
from client.train_local import evaluate
from client.trained_model import load_model
from server.app import REPRODUCIBLE_NOISE_KEY, RUN_DIR_KEY
from server.run_control import submit_and_follow
from server.run_folder import RunFolder
from server.server_config import ServerConfig
from server.superlink import FlowerControl, StatePaths
from shared.atomic_files import atomic_write_json
from shared.errors import UserError
from shared.metrics import to_jsonable
from shared.processes import executable, flower_env, free_port, start, stop
from simulations.materialise import SimLayout
from simulations.ray_cluster import cluster_run
from simulations.round_table import SITE_NAMES
from simulations.sim_config import SimConfig

TEST_METRICS = "test_metrics.json"


class SimulationError(UserError):
    pass


class SimulationControl(FlowerControl):
    """`flwr` against the simulation's own SuperLink: submits with the virtual hospitals' settings."""

    def __init__(self, server: ServerConfig, sites_dir: Path, config: SimConfig,
                 extra_run_config: dict[str, str] | None = None) -> None:
        super().__init__(server, insecure=True)
        self.sites_dir, self.sim = sites_dir, config.simulation
        self.extra_run_config = extra_run_config or {}

    def submit(self, run_dir: Path) -> int:
        backend = self.sim.backend
        federation = [f"num-supernodes={self.sim.sites}", f"client-resources-num-cpus={backend.cpus_per_site}",
                      *([f"init-args-num-cpus={backend.cpus}"] if backend.cpus else [])]
        run_config = f"{RUN_DIR_KEY}='{run_dir}' {SIMULATION_SITES_KEY}='{self.sites_dir}'"
        if self.sim.reproducible_noise:
            run_config += f" {REPRODUCIBLE_NOISE_KEY}='true'"
        run_config += "".join(f" {key}='{value}'" for key, value in self.extra_run_config.items())
        return self.submit_app(run_config, "--federation-config", " ".join(federation))


def run_simulation(config: SimConfig, layout: SimLayout, out: Path) -> Path:
    """Run the federation on the materialised sites; the run folder (raises SimulationError if it failed)."""
    out = Path(out).resolve()
    for site_yaml in layout.site_configs:  # written afresh by this run's ClientApps
        (site_yaml.parent / SIMULATED_NODE_ID_FILE).unlink(missing_ok=True)
    with _on_cluster(config, layout) as cluster:  # a cluster is checked before anything is started or written
        port = free_port()
        server = config.server_config(results_dir=out / "runs", state_dir=out / "state")
        server_yaml = _write_server_yaml(server, out, port)
        folder = RunFolder.create(server_yaml)
        ray = None if cluster is None else {"address": config.simulation.backend.address, "joined": cluster.address,
                                            "data": config.simulation.backend.data,
                                            "nodes": [view.node for view in cluster.nodes]}
        atomic_write_json(folder.path / "simulation.json", _plain(
            {"simulation": config.as_dict(), "sites_dir": layout.sites_dir, "test_config": layout.test_config,
             "ray_cluster": ray}))
        server = folder.config()
        paths = StatePaths(server)
        paths.dir.mkdir(parents=True, exist_ok=True)
        command = [executable("flower-superlink"), "--simulation", "--insecure", "--host", "127.0.0.1", "--port",
                   str(port), "--database", str(paths.database), "--log-file", str(paths.log),
                   "--disable-runtime-dependency-installation"]
        env = {**flower_env(paths.flwr_home), **(cluster.env if cluster else {})}
        try:
            start(command, paths.dir / "superlink.out", paths.pid, env, "the simulation SuperLink",
                  ready_port=("127.0.0.1", port))
            code = submit_and_follow(SimulationControl(server, layout.sites_dir, config,
                                                       cluster.run_config if cluster else None),
                                     folder, timeout=_run_timeout(config))
        finally:
            stop(paths.pid)  # and every process below it: the executor runs in a session of its own
    if code != 0:
        raise SimulationError(f"the simulation did not complete; see {folder.path / 'status.json'} and the logs in "
                              f"{paths.dir}")
    atomic_write_json(folder.path / SITE_NAMES, _site_names(layout))
    best = folder.path / "checkpoints" / "best.npz"
    checkpoint = best if best.is_file() else folder.path / "checkpoints" / "latest.npz"
    atomic_write_json(folder.path / TEST_METRICS, evaluate_checkpoint(checkpoint, layout))
    return folder.path


def _on_cluster(config: SimConfig, layout: SimLayout):
    """With ``backend.address``: the cluster held for the run (``ray_cluster.cluster_run``); else nothing."""
    backend = config.simulation.backend
    if not backend.address:
        return nullcontext()
    sites = {site_yaml.parent.name: site_yaml for site_yaml in layout.site_configs}
    return cluster_run(backend.address, sites, *cluster_paths(layout), travel=backend.data == "travel",
                       node_id_file=SIMULATED_NODE_ID_FILE)


def cluster_paths(layout: SimLayout) -> tuple[list[Path], list[Path]]:
    """What the virtual hospitals' ClientApps read (site.yaml, feature cache, trunk) and where they write
    (each hospital's folder: its ledger and node id): every node of a cluster must reach these."""
    read, write = [], []
    for site_yaml in layout.site_configs:
        config = load_site_config(site_yaml)
        read += [site_yaml, config.features.cache_dir]
        write += [site_yaml.parent, *([config.state_dir] if config.state_dir.is_dir() else [])]
        if config.features.backbone_weights not in BUILTIN_WEIGHTS:
            read.append(Path(config.features.backbone_weights))
    return list(dict.fromkeys(read)), write


def evaluate_checkpoint(checkpoint: Path, layout: SimLayout, test: list[SlideFeatures] | None = None) -> dict:
    """Metrics of a global-model checkpoint on the held-out test patients (slides or tile groups).

    ``test``: the test items in the checkpoint's class order, when a caller scores many checkpoints
    of one run (read once with ``cached_items``); by default they are read from the test cache.
    """
    model = load_model(Path(checkpoint), trunk_of(layout))
    if model.block is not None:
        raise SimulationError(f"{checkpoint}: trainable: last_block is not simulated yet (the test cache holds "
                              "tile vectors, not block inputs)")
    slides = cached_items(layout.test_config, "test", model.classes) if test is None else test
    if not slides:
        raise SimulationError(f"{layout.test_config}: no test item was prepared")
    metrics = evaluate(model.head, slides, list(model.classes), model.length, model.positive_class)
    return to_jsonable({"checkpoint": str(checkpoint), "round": model.round, "test_items": len(slides),
                        "test_patients": len({s.patient for s in slides}), **metrics})


def trunk_of(layout: SimLayout) -> str:
    """The trunk weights every virtual hospital of ``layout`` uses (a frozen projection is read from it)."""
    return load_site_config(layout.test_config).features.backbone_weights


def cached_items(site_config: Path, split: str, classes: Sequence[str]) -> list[SlideFeatures]:
    """The cached items of one split of a virtual hospital, labels numbered in ``classes`` order."""
    slides, names = load_split(FeatureCache(load_site_config(site_config).features.cache_dir), split)
    return [SlideFeatures(s.item_id, s.patient, list(classes).index(names[s.label]), s.features) for s in slides]


def _write_server_yaml(server: ServerConfig, out: Path, port: int) -> Path:
    """The server.yaml a consortium admin would have written for this run (the run folder keeps a copy)."""
    document = _plain(server.as_dict())
    # No site connects to a simulation, so no proxy runs: `port` (the SuperLink) is the loopback
    # port the admin commands use; the sites' port is a placeholder that must only differ from it.
    document["superlink"].update(host="127.0.0.1", loopback_port=port, port=free_port(avoid={port}))
    document = {k: v for k, v in document.items() if v is not None}
    document["superlink"] = {k: v for k, v in document["superlink"].items() if v is not None}
    path = out / "server.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("# written by fedpath-sim from sim.yaml\n" + yaml.safe_dump(document, sort_keys=False))
    return path


def _site_names(layout: SimLayout) -> dict[str, str]:
    """node-<id> (as the run folder names sites) -> site-001..., from the ids the ClientApps wrote."""
    names = {}
    for site_yaml in layout.site_configs:
        node_file = site_yaml.parent / SIMULATED_NODE_ID_FILE
        if node_file.is_file():
            names[f"node-{node_file.read_text().strip()}"] = site_yaml.parent.name
    return names


def _plain(document: dict) -> dict:
    """JSON types only (paths as text), as the run folder stores configs."""
    return json.loads(json.dumps(to_jsonable(document), default=str))


def _run_timeout(config: SimConfig) -> float:
    """Bound on the whole run: every exchange (rounds + the final scoring) may take its full timeout, plus start-up."""
    return 300.0 + 2 * (config.federation.rounds + 1) * config.federation.round_timeout
