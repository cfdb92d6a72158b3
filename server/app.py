"""The consortium's Flower ServerApp: exchanges in which the sites score the model they receive,
train it, and reply with one vector the server reads only summed over sites.

`fedpath-server run` creates the run folder and submits this app with ``run-dir`` in the run
config; `fedpath-server resume` submits it again for the same folder, and the app continues
after the last checkpoint. A run of T rounds is T + 1 exchanges: the last one only scores the
final model. It runs on Flower's legacy workflow because Flower's SecAgg+ runs only there
(``docs/library-notes.md``).
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
from server.relay_signals import RelayLink
from server.run_folder import RunFolder
from server.run_recorder import RunRecorder, round_sites
from server.secure_aggregation import fit_workflow
from server.server_config import ServerConfig
from server.server_optimizer import ServerOptimizer
from server.site_registry import SiteRegistry
from server.strategies import build_strategy
from server.superlink import StatePaths
from server.wire_log import WireLog
from shared.model import build_trainable
from shared.parameters import model_arrays
from shared.round_plan import RoundPlan

RUN_DIR_KEY = "run-dir"
REPRODUCIBLE_NOISE_KEY = "reproducible-noise"
"""Run config key `fedpath-sim run` sets when sim.yaml asks for replayable DP noise (deployed sites refuse it)."""

log = logging.getLogger("fedpath.server")
app = ServerApp()


@app.main()
def main(grid, context: Context) -> None:
    """The ServerApp's entry point, run by the SuperLink for a submitted run: the run folder named in the run
    config (``run-dir``) gets ``running``, then ``finished`` or ``failed`` with the reason, whatever happens.

    Args:
        grid: Flower's grid (the SuperLink's side of the sites).
        context: the run's context; its run config names the run folder.
    """
    folder = RunFolder.open(Path(str(context.run_config[RUN_DIR_KEY])))
    try:
        run_federation(grid, context, folder)
    except BaseException as exc:
        folder.write_status(state="failed", message=str(exc) or type(exc).__name__)
        raise
    folder.write_status(state="finished", message="all rounds done")


def run_federation(grid, context: Context, folder: RunFolder) -> None:
    """The run's rounds from its last checkpoint on (a new run starts from the initial model, round 0), then
    the exchange that scores the final model: Flower's legacy workflow with the federation strategy, under
    SecAgg+ when the consortium turns it on.

    Args:
        grid: Flower's grid.
        context: the run's context (``reproducible-noise`` for simulations).
        folder: the run folder: its config, checkpoints, status and audit log.
    """
    config = folder.config()
    total = config.federation.rounds
    folder.write_status(state="running", message="starting", total_rounds=total)
    initial = initial_model(config)
    names = list(initial)
    reproducible = str(context.run_config.get(REPRODUCIBLE_NOISE_KEY, "")).lower() == "true"
    recorder = RunRecorder(folder, config, names, reproducible_noise=reproducible)
    latest = recorder.resume()
    if latest is None:  # round 0: the initial model, scored by the sites in the first exchange
        recorder.save_model(0, list(initial.values()), {})
        latest = recorder.latest
    done = latest.round
    exchanges = (total - done) + (0 if done >= total and recorder.latest_closed else 1)
    if exchanges <= 0:
        log.info("%s: all %d rounds are already done and scored", folder.path, total)
        return
    log.info("%s: rounds %d..%d of %d%s (%s)", folder.path, done + 1, total, total,
             ", then scoring the final model", "resumed" if done else "new run")
    registry = SiteRegistry(StatePaths(config).registry)
    workflow = fit_workflow(config)
    optimizer = ServerOptimizer(config.strategy.server_optimizer, [a.shape for a in initial.values()], folder.path)
    optimizer.restore(done)
    strategy = FederationStrategy(
        config, build_strategy(config), recorder, [(n, tuple(a.shape)) for n, a in initial.items()],
        list(latest.arrays.values()), first_round=done + 1,
        plan_for=lambda round_: round_plan(config, folder.federation_id, round_, reproducible),
        site_name=registry.name_for, on_sampled=None if workflow is None else workflow.round_size,
        optimizer=optimizer, rejoining=round_sites(latest.card),
        counts_released=(lambda: True) if workflow is None else workflow.relay.every_site_offered)
    legacy = LegacyContext(context, config=FlowerServerConfig(num_rounds=exchanges,
                                                              round_timeout=config.federation.round_timeout),
                           strategy=strategy)
    observers, outgoing = [strategy.observe], []
    if workflow is not None:
        observers.append(workflow.relay.observe)
        outgoing.append(workflow.relay.attach)
    if config.federation.wire_log:
        observers.append(WireLog(folder.path / "wire.jsonl").record)
    relay = RelayLink(StatePaths(config).relay_wake)
    try:
        DefaultWorkflow(fit_workflow=workflow)(TimeoutGrid(grid, config.federation.round_timeout, observers,
                                                           outgoing, relay), legacy)
    finally:
        relay.close()


def initial_model(config: ServerConfig):
    """The round-0 global model: the configured head, seeded, so a run is reproducible (last_block:
    with the pinned trunk's last block in front)."""
    torch.manual_seed(config.training.seed)
    return model_arrays(build_trainable(config.model, len(config.classes), config.trunk_weights))


def evaluated(config: ServerConfig, round_: int) -> bool:
    """Whether the sites score the model they receive in fedpath round ``round_`` (model ``round_ - 1``):
    every ``evaluate_every`` rounds, and always in the last, scoring-only exchange."""
    return (round_ - 1) % config.federation.evaluate_every == 0 or round_ == config.federation.rounds + 1


def round_plan(config: ServerConfig, federation_id: str, round_: int, reproducible_noise: bool = False) -> RoundPlan:
    """What every site is asked in fedpath round ``round_`` of federation ``federation_id`` (the round after the
    last one, ``rounds + 1``, only scores the final model). The same for every round but its number and whether
    it trains and scores, so the sites' noise plans, pinned to it, hold for the whole run.

    Args:
        config: the consortium's server.yaml, loaded.
        federation_id: the run folder's name (names each site's ledger).
        round_: fedpath's round number, from 1.
        reproducible_noise: simulations only: the sites seed their DP noise from the plan's seed.
    """
    training, secagg, rounds = config.training, config.secure_aggregation, config.federation.rounds
    spare = config.federation.spare_rounds  # the sites' budgets also last this many redone rounds
    return RoundPlan(
        federation_id=federation_id, round=round_, planned_rounds=rounds + spare,
        classes=config.classes, positive_class=config.positive_class, model=config.model,
        sequence_length=training.sequence_length, epochs=training.epochs, batch_size=training.batch_size,
        learning_rate=training.learning_rate, seed=training.seed,
        proximal_mu=config.strategy.proximal_mu if config.strategy.name == "fedprox" else 0.0,
        privacy=config.privacy, max_update_norm=config.federation.max_update_norm,
        secagg_clipping_range=secagg.clipping_range if secagg.enabled else None, weight_scale=secagg.max_weight,
        train=round_ <= rounds, evaluate=evaluated(config, round_),
        evaluations=sum(evaluated(config, r) for r in range(1, rounds + 2)) + spare,
        evaluation_bins=config.federation.evaluation_bins, reproducible_noise=reproducible_noise)
