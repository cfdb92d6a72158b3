"""The round logic around Flower's sampling and aggregation rules: who takes part, what they are told,
what is read back from their replies, and what is recorded.

Every exchange is one Flower training round. In fedpath round ``r`` the sites score the model they
received (the global model after round ``r - 1``), train it, and reply with one vector that the
server reads only summed over sites (``shared/round_sums.py``): the patient-weighted update, the
number of training patients and the evaluation counts. A last exchange after the final round only
scores the final model. So round ``r``'s reply completes model ``r - 1``'s record (its metrics)
and creates model ``r``; the ``RunRecorder`` writes both.

Under SecAgg+ every reply the strategy sees carries the same unmasked mean of the vectors, and
``m`` (the number of replies) times it is their sum. Without SecAgg+ the replies are the sites'
own vectors: each is checked (shapes, finite, norm) and the robust rules (median, trimmed mean,
Krum: Flower's own) aggregate the sites' decoded updates. FedAvg and FedProx need no rule: the sum
of ``patients · update`` over the sum of ``patients`` is FedAvg weighted by patients.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Iterable

import numpy as np
from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from server.round_metrics import SiteRound
from server.run_recorder import RunRecorder
from server.server_config import ServerConfig, ServerOptimizerConfig
from server.server_optimizer import ServerOptimizer
from shared.errors import UserError
from shared.parameters import ParameterMismatch, pack, update_problem
from shared.refusals import BUDGET_REFUSAL, UNSAFE_ROUND_REFUSAL, refusal_code, refusal_text
from shared.round_plan import RoundPlan
from shared.round_sums import CountLayout, RoundSums, decode_sum

log = logging.getLogger("fedpath.server")

REJOIN_POLL_S = 0.5  # seconds between two looks at who is online (each one request to the SuperLink)

SUMMED = ("fedavg", "fedprox")
"""Strategies whose aggregate is the patient-weighted mean: read straight from the summed replies."""


class FederationError(UserError):
    """The run cannot go on (too few sites, no valid update); the message says why."""


class FederationStrategy(Strategy):
    """Args:
        config: the consortium's server.yaml.
        inner: Flower's strategy of ``strategy.name``: samples the sites, and aggregates the decoded
            per-site updates for the robust rules (plain replies only).
        recorder: writes checkpoints, cards, audit records and reports.
        shapes: (name, shape) of every trainable tensor, in the wire order (the wire sends them
            packed into one vector both ways: ``shared/parameters.pack``).
        global_arrays: the global model to start from.
        first_round: fedpath's number of the first exchange (rounds continue across a resume).
        plan_for: the round plan of a fedpath round.
        site_name: a node id's hospital name.
        on_sampled: called with the number of sites sampled for a round, before the round starts
            (SecAgg+ sets the round's reconstruction threshold from it).
        optimizer: the server's step on the aggregated update (``strategy.server_optimizer``), its state
            already restored for ``first_round``; None: add the update (FedAvg).
        rejoining: names of the sites that took part in the round before ``first_round`` (a resumed run:
            the last checkpoint's); the first round waits ``federation.rejoin_wait`` for them to be online.
        counts_released: asked when a round's sum is in: whether the sites released their evaluation counts
            into it. Under SecAgg+ they do only when every site of the round offered them
            (``SignatureRelay.every_site_offered``); otherwise the zero counts are no score, and the model is
            recorded as not scored.
    """

    def __init__(self, config: ServerConfig, inner: Strategy, recorder: RunRecorder,
                 shapes: list[tuple[str, tuple[int, ...]]], global_arrays: list[np.ndarray], first_round: int,
                 plan_for: Callable[[int], RoundPlan], site_name: Callable[[int], str],
                 on_sampled: Callable[[int], None] | None = None, optimizer: ServerOptimizer | None = None,
                 rejoining: Iterable[str] = (), counts_released: Callable[[], bool] = lambda: True) -> None:
        self.config, self.inner, self.recorder = config, inner, recorder
        self.counts_released = counts_released
        self.shapes, self.global_arrays = shapes, global_arrays
        self.tensor_shapes = [tuple(shape) for _, shape in shapes]
        self.offset = first_round - 1
        self.plan_for, self.site_name, self.on_sampled = plan_for, site_name, on_sampled
        self.optimizer = optimizer or ServerOptimizer(ServerOptimizerConfig(), [a.shape for a in global_arrays])
        self.layout = CountLayout.for_federation(config.classes, config.positive_class,
                                                 config.federation.evaluation_bins)
        self.sites: dict[str, SiteRound] = {}
        self.rejoining = set(rejoining)  # the sites of the last round: the next one waits for them a while
        self.clock: dict[str, float] = {}  # phase boundaries of the current round (monotonic seconds)

    def __repr__(self) -> str:
        return f"FederationStrategy({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        return ndarrays_to_parameters(pack(self.global_arrays))

    def observe(self, replies: list[Message]) -> None:
        """Every reply of the round's exchanges (TimeoutGrid): error replies name their site's refusal."""
        for reply in replies:
            if reply.metadata.message_type != MessageType.TRAIN or not reply.has_error():
                continue
            site = self.sites.setdefault(self.site_name(reply.metadata.src_node_id), SiteRound())
            code, refused = reply.error.code, refusal_code(reply.error.code)
            site.refused = site.refused if refused is None else refused
            log.warning("round %d: %s answered with an error: %s", self.offset + int(reply.metadata.group_id or 0),
                        self.site_name(reply.metadata.src_node_id),
                        f"Flower error {code}" if refused is None else refusal_text(refused))

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        round_ = self.offset + server_round
        if self.sites:  # the round before, in this process (before it: the one the run resumes after)
            self.rejoining = {name for name, site in self.sites.items() if site.answered or site.refused}
        self.sites = {}
        self._wait_for_sites(client_manager, round_)
        self._wait_for_rejoining(client_manager, round_)
        self.clock = {"start": time.monotonic()}
        plan = self.plan_for(round_).to_config()
        sampled = self.inner.configure_fit(server_round, parameters, client_manager)
        if self.on_sampled is not None:
            self.on_sampled(len(sampled))
        return [(proxy, FitIns(ins.parameters, {**ins.config, **plan})) for proxy, ins in sampled]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:
        round_ = self.offset + server_round
        plan = self.plan_for(round_)
        self.clock["fit_done"] = time.monotonic()
        for proxy, res in results:
            site = self.sites.setdefault(self.site_name(proxy.node_id), SiteRound())
            site.answered = True
            site.disclosed = {key: float(value) for key, value in res.metrics.items()}
            site.refused = int(res.metrics.get("refused", 0))
            if site.refused:
                log.warning("round %d: %s sat out: %s", round_, self.site_name(proxy.node_id),
                            refusal_text(site.refused))
        if failures:
            log.warning("round %d: %d reply/replies failed or did not arrive", round_, len(failures))
        sums, trained = self._read(round_, results, plan.train)
        if plan.train:
            minimum = self.config.federation.min_sites
            if sums is None or sums.update is None or trained < minimum:
                out_of_budget = sum(1 for s in self.sites.values() if s.refused == BUDGET_REFUSAL)
                raise FederationError(
                    f"round {round_} failed: {trained} site(s) sent a usable update, the minimum is {minimum} "
                    f"(federation.min_sites); {len(failures)} failed or timed out, "
                    f"{sum(1 for s in self.sites.values() if s.refused)} refused. See `fedpath-server status`."
                    + (f" {out_of_budget} site(s) are out of privacy budget: a round redone after a crash spends "
                       "again, which only a budget planned with federation.spare_rounds has room for (a new "
                       "federation; the plan of this one cannot change)." if out_of_budget else ""))
            problem = update_problem(self.shapes, sums.update, self.config.federation.max_update_norm)
            if problem:
                raise FederationError(f"round {round_} failed: the aggregated update is unusable: {problem}")
        evaluation = sums.evaluation.metrics(self.config.classes, self.config.positive_class) \
            if sums is not None and plan.evaluate and self.counts_released() else None
        self.recorder.close_model(round_ - 1, evaluation)
        if plan.train:
            self.global_arrays = self.optimizer.apply(self.global_arrays, sums.update)
            self.optimizer.save(round_)  # before the checkpoint that marks the round done
            self.recorder.save_model(round_, self.global_arrays, self.sites, self._timing(),
                                     patients=sums.patients)
        return ndarrays_to_parameters(pack(self.global_arrays)), {}

    def _read(self, round_: int, results: list[tuple[ClientProxy, FitRes]],
              training: bool) -> tuple[RoundSums | None, int]:
        """The round's sums from the replies, and how many sites contributed an update."""
        scale = self.config.secure_aggregation.max_weight
        shapes = self.tensor_shapes if training else []  # an exchange that does not train: only the counts
        replies = [(proxy, self.site_name(proxy.node_id), parameters_to_ndarrays(res.parameters))
                   for proxy, res in results]
        if not replies:
            return None, 0
        if self.config.secure_aggregation.enabled:
            # Every reply carries the unmasked mean of the m masked vectors: m times it is their sum.
            mean = replies[0][2]
            trained = sum(1 for _, name, _ in replies if self.sites[name].trained)
            return decode_sum([a * len(replies) for a in mean], self.layout, scale, shapes), trained
        usable = []
        for proxy, name, vector in replies:  # plain replies: each site's own vector, checked one by one
            one, problem = self._read_one(vector, shapes, training and self.sites[name].trained)
            if problem:
                log.warning("round %d: reply of %s rejected: %s", round_, name, problem)
                self.sites[name].rejected = problem
                continue
            usable.append((proxy, vector, one))
        if not usable:
            return None, 0
        total = decode_sum([sum(parts) for parts in zip(*(vector for _, vector, _ in usable), strict=True)],
                           self.layout, scale, shapes)
        trained = [(proxy, one) for proxy, _, one in usable if one.update is not None]
        if self.config.strategy.name in SUMMED or not trained:
            return total, len(trained)
        robust = [(proxy, FitRes(Status(code=Code.OK, message=""), ndarrays_to_parameters(one.update),
                                 max(1, round(one.patients)), {})) for proxy, one in trained]
        aggregated, _ = self.inner.aggregate_fit(round_ - self.offset, robust, [])
        return RoundSums(parameters_to_ndarrays(aggregated), total.patients, total.evaluation), len(trained)

    def _read_one(self, vector: list[np.ndarray], shapes: list[tuple[int, ...]],
                  says_trained: bool) -> tuple[RoundSums | None, str | None]:
        """One site's plain reply read back, or why it must not be used."""
        try:
            one = decode_sum(vector, self.layout, self.config.secure_aggregation.max_weight, shapes)
        except ParameterMismatch as exc:  # another length: another model, class list or version
            return None, str(exc)
        if one.update is None:
            return one, "no training patients" if says_trained else None
        return one, update_problem(self.shapes, one.update, self.config.federation.max_update_norm)

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        round_ = self.offset + server_round
        if "fit_done" not in self.clock:  # SecAgg+ halted before unmasking: this round's replies never came
            refusals = "; ".join(f"{name} refused: {refusal_text(site.refused)} (code {site.refused})"
                                 for name, site in sorted(self.sites.items()) if site.refused)
            codes = {site.refused for site in self.sites.values() if site.refused}
            sat_out = (" A site that sits a SecAgg+ round out is not in the sum, and the sites that trained refuse a "
                       "sum of fewer sites than their federation.min_round_sites (code 9)."
                       if UNSAFE_ROUND_REFUSAL in codes and codes - {UNSAFE_ROUND_REFUSAL} else "")
            raise FederationError(
                f"round {round_} failed: secure aggregation stopped before the sum could be unmasked (fewer sites "
                "than the round's reconstruction threshold completed its stages, or sites refused its settings)"
                + (f": {refusals}" if refusals else "") + "." + sat_out
                + " See the run's log and `fedpath-server status`.")
        return []  # evaluation rides in the next training exchange, inside the masked sum

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list) -> tuple[float | None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None  # the server holds no data: evaluation happens at the sites

    def _timing(self) -> dict[str, float]:
        """Where the round's time went; sites disclose their own training time only if they choose to."""
        now, clock = time.monotonic(), self.clock
        train = [s.value("train_seconds") for s in self.sites.values() if not math.isnan(s.value("train_seconds"))]
        start = clock.get("start", now)
        return {"round_s": now - start, "fit_phase_s": clock.get("fit_done", now) - start,
                "site_train_s_max": max(train) if train else math.nan}

    def _wait_for_rejoining(self, client_manager: ClientManager, round_: int) -> None:
        """Give the sites of the last round that are not online ``federation.rejoin_wait`` seconds to come
        back before the round is sampled. After a server restart the SuperLink lists a SuperNode as online
        only from its next heartbeat, which Flower retries with back-off (up to 20 s apart); a round
        sampled before then runs without that site, and the others may refuse a round that small
        (``min_round_sites``, refusal 9), which failed the resumed run."""
        wait = self.config.federation.rejoin_wait
        if wait <= 0 or not self.rejoining:
            return
        missing = self.rejoining - self._online(client_manager)
        if not missing:
            return
        waiting = (f"round {round_} waits up to {wait:g} s (federation.rejoin_wait) for {', '.join(sorted(missing))} "
                   "of the last round to be online")
        log.warning("%s", waiting)  # a warning: the run's log (`flwr log`) keeps fedpath's warnings, not its info
        self.recorder.note_waiting(waiting)  # and `fedpath-server status` shows it meanwhile
        deadline = time.monotonic() + wait
        while missing and time.monotonic() < deadline:
            time.sleep(min(REJOIN_POLL_S, max(0.0, deadline - time.monotonic())))
            missing = self.rejoining - self._online(client_manager)
        self.recorder.note_waiting(None)
        if missing:
            log.warning("round %d starts without %s: not online within federation.rejoin_wait (%g s)", round_,
                        ", ".join(sorted(missing)), wait)

    def _online(self, client_manager: ClientManager) -> set[str]:
        """Names of the sites the SuperLink lists as online (``all()`` asks it again)."""
        return {self.site_name(int(proxy.node_id)) for proxy in client_manager.all().values()}

    def _wait_for_sites(self, client_manager: ClientManager, round_: int) -> None:
        minimum, timeout = self.config.federation.min_sites, self.config.federation.round_timeout
        if not client_manager.wait_for(minimum, timeout=math.ceil(timeout)):
            raise FederationError(
                f"round {round_} cannot start: {client_manager.num_available()} site(s) online after waiting "
                f"{timeout:g} s, federation.min_sites is {minimum}. Start more sites (`fedpath-site start`) and "
                "`fedpath-server resume` the run.")
