"""The round logic around Flower's aggregation rule: who takes part, what they are told, what is
accepted, and what is recorded.

``FederationStrategy`` wraps a Flower strategy (``server/strategies.py``): it waits for the
minimum number of sites (with the round timeout, then fails with a clear message), sends
every site the ``RoundPlan``, sets refused and malformed updates aside, applies the
aggregated update to the global model, and hands every round to the ``RunRecorder``.
Round numbers continue across a resume (``first_round``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np
from flwr.common import (EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from server.round_metrics import SiteRound, confusion_from_metrics
from server.run_recorder import RunRecorder
from server.server_config import ServerConfig
from shared.errors import UserError
from shared.parameters import add, update_problem
from shared.round_plan import REFUSALS, RoundPlan

log = logging.getLogger("fedpath.server")


class FederationError(UserError):
    """The run cannot go on (too few sites, no valid update); the message says why."""


class FederationStrategy(Strategy):
    def __init__(self, config: ServerConfig, inner: Strategy, recorder: RunRecorder,
                 shapes: list[tuple[str, tuple[int, ...]]], global_arrays: list[np.ndarray], first_round: int,
                 plan_for: Callable[[int], RoundPlan], site_name: Callable[[int], str]) -> None:
        self.config, self.inner, self.recorder = config, inner, recorder
        self.shapes, self.global_arrays = shapes, global_arrays
        self.offset = first_round - 1
        self.plan_for, self.site_name = plan_for, site_name
        self.sites: dict[str, SiteRound] = {}
        self.clock: dict[str, float] = {}  # phase boundaries of the current round (monotonic seconds)

    def __repr__(self) -> str:
        return f"FederationStrategy({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        return ndarrays_to_parameters(self.global_arrays)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        round_ = self.offset + server_round
        self.sites = {}
        self._wait_for_sites(client_manager, round_)
        self.clock = {"start": time.monotonic()}
        plan = self.plan_for(round_).to_config()
        return [(proxy, FitIns(ins.parameters, {**ins.config, **plan}))
                for proxy, ins in self.inner.configure_fit(server_round, parameters, client_manager)]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:
        round_ = self.offset + server_round
        self.clock["fit_done"] = time.monotonic()
        accepted = []
        for proxy, res in results:
            name = self.site_name(proxy.node_id)
            site = self.sites.setdefault(name, SiteRound())
            metrics = res.metrics
            site.refused = int(metrics.get("refused", 0))
            for key in ("train_loss", "epsilon", "delta", "would_spend", "budget_epsilon", "train_seconds"):
                setattr(site, key, float(metrics.get(key, math.nan)))
            if site.refused:
                log.warning("round %d: %s sat out: %s", round_, name, REFUSALS.get(site.refused, site.refused))
                continue
            problem = self._update_problem(parameters_to_ndarrays(res.parameters), res.num_examples)
            if problem:
                log.warning("round %d: update of %s rejected: %s", round_, name, problem)
                site.rejected = problem
                continue
            site.examples = res.num_examples
            accepted.append((proxy, res))
        if failures:
            log.warning("round %d: %d site(s) failed or did not answer: %s", round_, len(failures),
                        "; ".join(_failure_text(f) for f in failures))
        minimum = self.config.federation.min_sites
        if len(accepted) < minimum:
            raise FederationError(
                f"round {round_} failed: {len(accepted)} site(s) sent a usable update, the minimum is {minimum} "
                f"(federation.min_sites); {len(failures)} failed or timed out, "
                f"{sum(1 for s in self.sites.values() if s.refused)} refused. See `fedpath-server status`.")
        aggregated, _ = self.inner.aggregate_fit(server_round, accepted, failures)
        update = parameters_to_ndarrays(aggregated)
        problem = self._update_problem(update, 1)
        if problem:
            raise FederationError(f"round {round_} failed: the aggregated update is unusable: {problem}")
        self.global_arrays = add(self.global_arrays, update)
        return ndarrays_to_parameters(self.global_arrays), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        round_ = self.offset + server_round
        if "fit_done" not in self.clock:  # SecAgg+ halted before unmasking: no update this round
            raise FederationError(
                f"round {round_} failed: secure aggregation stopped before the sum could be unmasked (fewer than "
                f"secure_aggregation.reconstruction_threshold sites completed its stages). See the run's log.")
        plan = self.plan_for(round_).to_config()
        self.clock["evaluate_start"] = time.monotonic()
        return [(proxy, EvaluateIns(ins.parameters, {**ins.config, **plan}))
                for proxy, ins in self.inner.configure_evaluate(server_round, parameters, client_manager)]

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list) -> tuple[float | None, dict]:
        round_ = self.offset + server_round
        for proxy, res in results:
            site = self.sites.setdefault(self.site_name(proxy.node_id), SiteRound())
            site.val_slides, site.val_loss = res.num_examples, float(res.loss)
            site.eval = {k: float(v) for k, v in res.metrics.items() if not k.startswith("cm_")}
            site.confusion = confusion_from_metrics(res.metrics, len(self.config.classes))
            if math.isnan(site.epsilon):
                site.epsilon = float(res.metrics.get("epsilon", math.nan))
        entry = self.recorder.finish_round(round_, self.global_arrays, self.sites, self._timing())
        loss = entry["global"]["loss"]
        return (None if math.isnan(loss) else loss), {}

    def _timing(self) -> dict[str, float]:
        """Where the round's time went: the sites' own training against everything else."""
        now, clock = time.monotonic(), self.clock
        train = [s.train_seconds for s in self.sites.values() if not math.isnan(s.train_seconds)]
        start = clock.get("start", now)
        return {"round_s": now - start, "fit_phase_s": clock.get("fit_done", now) - start,
                "evaluate_phase_s": now - clock.get("evaluate_start", now),
                "site_train_s_max": max(train) if train else math.nan}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None  # the server holds no data: evaluation happens at the sites

    def _wait_for_sites(self, client_manager: ClientManager, round_: int) -> None:
        minimum, timeout = self.config.federation.min_sites, self.config.federation.round_timeout
        if not client_manager.wait_for(minimum, timeout=math.ceil(timeout)):
            raise FederationError(
                f"round {round_} cannot start: {client_manager.num_available()} site(s) online after waiting "
                f"{timeout:g} s, federation.min_sites is {minimum}. Start more sites (`fedpath-site start`) and "
                "`fedpath-server resume` the run.")

    def _update_problem(self, arrays: list[np.ndarray], examples: int) -> str | None:
        if examples <= 0:
            return "no training examples"
        # Under SecAgg+ every reply carries the unmasked sum; its norm bound is the same (a mean of
        # updates within the bound stays within it).
        return update_problem(self.shapes, arrays, self.config.federation.max_update_norm)


def _failure_text(failure) -> str:
    if isinstance(failure, BaseException):
        return str(failure) or type(failure).__name__
    proxy, res = failure
    return f"node {proxy.node_id}: {res.status.message}"
