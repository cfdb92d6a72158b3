"""The consortium's Flower ServerApp: rounds of train-at-the-sites, aggregate, evaluate-at-the-sites.

`fedpath-server run` creates the run folder and submits this app with ``run-dir`` in the run
config; `fedpath-server resume` submits it again for the same folder, and the app continues
after the last checkpoint. It runs on Flower's legacy workflow because Flower's SecAgg+
runs only there (``../shared/notes/flower.md``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from flwr.app import Context
from flwr.server import LegacyContext, ServerApp, ServerConfig as FlowerServerConfig
from flwr.server.workflow import DefaultWorkflow

from server.federation_strategy import FederationStrategy
from server.grid_timeout import TimeoutGrid
from server.run_folder import RunFolder
from server.run_recorder import RunRecorder
from server.secure_aggregation import fit_workflow
from server.server_config import ServerConfig
from server.site_registry import SiteRegistry
from server.superlink import StatePaths
from server.strategies import build_strategy
from server.wire_log import WireLog
from shared.model import build_trainable
from shared.parameters import model_arrays
from shared.round_plan import RoundPlan

RUN_DIR_KEY = "run-dir"

log = logging.getLogger("fedpath.server")
app = ServerApp()


@app.main()
def main(grid, context: Context) -> None:
    folder = RunFolder.open(Path(str(context.run_config[RUN_DIR_KEY])))
    try:
        run_federation(grid, context, folder)
    except BaseException as exc:
        folder.write_status(state="failed", message=str(exc) or type(exc).__name__)
        raise
    folder.write_status(state="finished", message="all rounds done")


def run_federation(grid, context: Context, folder: RunFolder) -> None:
    config = folder.config()
    folder.write_status(state="running", message="starting", total_rounds=config.federation.rounds)
    initial = initial_model(config)
    names = list(initial)
    recorder = RunRecorder(folder, config, names)
    latest = recorder.resume()
    arrays = list(initial.values()) if latest is None else list(latest.arrays.values())
    done = 0 if latest is None else latest.round
    remaining = config.federation.rounds - done
    if remaining <= 0:
        log.info("%s: all %d rounds are already done", folder.path, config.federation.rounds)
        return
    log.info("%s: rounds %d..%d of %d (%s)", folder.path, done + 1, config.federation.rounds,
             config.federation.rounds, "resumed" if done else "new run")
    registry = SiteRegistry(StatePaths(config).registry)
    strategy = FederationStrategy(
        config, build_strategy(config), recorder, [(n, tuple(a.shape)) for n, a in initial.items()], arrays,
        first_round=done + 1, plan_for=lambda round_: round_plan(config, folder.federation_id, round_),
        site_name=registry.name_for)
    legacy = LegacyContext(context, config=FlowerServerConfig(num_rounds=remaining,
                                                              round_timeout=config.federation.round_timeout),
                           strategy=strategy)
    wire_log = WireLog(folder.path / "wire.jsonl") if config.federation.wire_log else None
    DefaultWorkflow(fit_workflow=fit_workflow(config))(
        TimeoutGrid(grid, config.federation.round_timeout, wire_log), legacy)


def initial_model(config: ServerConfig):
    """The round-0 global model: the configured head, seeded, so a run is reproducible (last_block:
    with the pinned trunk's last block in front)."""
    torch.manual_seed(config.training.seed)
    return model_arrays(build_trainable(config.model, len(config.classes), config.trunk_weights))


def round_plan(config: ServerConfig, federation_id: str, round_: int) -> RoundPlan:
    training, secagg = config.training, config.secure_aggregation
    return RoundPlan(
        federation_id=federation_id, round=round_, planned_rounds=config.federation.rounds,
        classes=config.classes, positive_class=config.positive_class, model=config.model,
        sequence_length=training.sequence_length, epochs=training.epochs, batch_size=training.batch_size,
        learning_rate=training.learning_rate, seed=training.seed,
        proximal_mu=config.strategy.proximal_mu if config.strategy.name == "fedprox" else 0.0,
        privacy=config.privacy, max_update_norm=config.federation.max_update_norm,
        secagg_clipping_range=secagg.clipping_range if secagg.enabled else None,
        secagg_max_weight=secagg.max_weight if secagg.enabled else None)
