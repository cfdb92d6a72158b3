"""server.federation_strategy around real Flower strategies, with fake sites (no network, no processes)."""

import math
import time

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from server.app import round_plan
from server.federation_strategy import FederationError, FederationStrategy
from server.round_metrics import SiteRound, pooled
from server.server_config import FederationConfig, SecureAggregationConfig, ServerConfig, StrategyConfig
from server.strategies import build_strategy
from shared.round_plan import PLAN_KEY, RoundPlan

SHAPES = [("w", (2, 2)), ("b", (2,))]
GLOBAL = [np.ones((2, 2), np.float32), np.zeros(2, np.float32)]
CLASSES = ("adenoma", "adenocarcinoma")


class FakeProxy(ClientProxy):
    """A site as the strategy sees it: only its node id matters; nothing is ever sent."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


class FakeRecorder:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.calls = []

    def finish_round(self, round_, arrays, sites, timing=None):
        self.calls.append((round_, [a.copy() for a in arrays], sites, timing))
        return {"round": round_, "global": pooled(sites, self.config.classes, self.config.positive_class)}


def _config(strategy: str = "fedavg", min_sites: int = 2, timeout: float = 1.0, max_norm: float = 1000.0,
            mu: float = 0.01) -> ServerConfig:
    return ServerConfig(classes=CLASSES, federation=FederationConfig(rounds=5, min_sites=min_sites,
                                                                     round_timeout=timeout, max_update_norm=max_norm),
                        strategy=StrategyConfig(name=strategy, proximal_mu=mu),
                        secure_aggregation=SecureAggregationConfig(enabled=False))


def _strategy(config: ServerConfig, first_round: int = 1):
    recorder = FakeRecorder(config)
    strategy = FederationStrategy(config, build_strategy(config), recorder, SHAPES, [a.copy() for a in GLOBAL],
                                  first_round=first_round, plan_for=lambda r: round_plan(config, "fed-1", r),
                                  site_name=lambda node_id: f"site-{node_id}")
    return strategy, recorder


def _update(value: float) -> list[np.ndarray]:
    return [np.full((2, 2), value, np.float32), np.full(2, -value, np.float32)]


def _fit_res(update, examples: int, refused: int = 0, **metrics) -> FitRes:
    values = {"train_loss": 0.5, "epsilon": 1.5, "delta": 1e-5, "noise_multiplier": 1.0, "refused": float(refused),
              "would_spend": math.nan, "budget_epsilon": 8.0, "train_seconds": 2.0, **metrics}
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), examples, values)


def _eval_res(loss: float, slides: int, confusion, auc: float, **metrics) -> EvaluateRes:
    values = {"accuracy": 0.0, "auc": auc, **{f"cm_{i}_{j}": float(confusion[i][j]) for i in range(2)
                                              for j in range(2)}, **metrics}
    return EvaluateRes(Status(Code.OK, ""), loss, slides, values)


def test_fedavg_adds_the_example_weighted_mean_update_to_the_global_model():
    strategy, _ = _strategy(_config())
    results = [(FakeProxy(1), _fit_res(_update(4.0), 1)), (FakeProxy(2), _fit_res(_update(0.0), 3))]
    parameters, metrics = strategy.aggregate_fit(1, results, [])
    new = parameters_to_ndarrays(parameters)
    # weights 1/4 and 3/4: mean update 1.0 for w, -1.0 for b
    np.testing.assert_array_equal(new[0], np.full((2, 2), 2.0, np.float32))
    np.testing.assert_array_equal(new[1], np.full(2, -1.0, np.float32))
    assert metrics == {}
    for a, b in zip(new, strategy.global_arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    assert strategy.sites["site-1"].examples == 1 and strategy.sites["site-2"].examples == 3
    assert strategy.sites["site-1"].epsilon == 1.5 and strategy.sites["site-2"].train_seconds == 2.0

    # the next round starts from the new global model
    parameters, _ = strategy.aggregate_fit(2, [(FakeProxy(1), _fit_res(_update(1.0), 2)),
                                               (FakeProxy(2), _fit_res(_update(3.0), 2))], [])
    np.testing.assert_array_equal(parameters_to_ndarrays(parameters)[0], np.full((2, 2), 4.0, np.float32))


def test_median_ignores_weights_and_outliers():
    strategy, _ = _strategy(_config("median", min_sites=3))
    results = [(FakeProxy(1), _fit_res(_update(1.0), 100)), (FakeProxy(2), _fit_res(_update(2.0), 1)),
               (FakeProxy(3), _fit_res(_update(50.0), 1))]
    new = parameters_to_ndarrays(strategy.aggregate_fit(1, results, [])[0])
    np.testing.assert_array_equal(new[0], np.full((2, 2), 3.0, np.float32))  # 1 + median(1, 2, 50)
    np.testing.assert_array_equal(new[1], np.full(2, -2.0, np.float32))


def test_refused_and_malformed_updates_are_set_aside():
    strategy, _ = _strategy(_config(max_norm=20.0))
    nan_update = _update(2.0)
    nan_update[1][0] = np.nan
    wrong_shape = [np.full((3, 2), 100.0, np.float32), np.zeros(2, np.float32)]
    results = [
        (FakeProxy(1), _fit_res(_update(1.0), 2)),
        (FakeProxy(2), _fit_res(_update(3.0), 2)),
        (FakeProxy(3), _fit_res(_update(0.0), 0, refused=1, epsilon=7.9, would_spend=9.5, budget_epsilon=8.0)),
        (FakeProxy(4), _fit_res(nan_update, 5)),
        (FakeProxy(5), _fit_res(wrong_shape, 5)),
        (FakeProxy(6), _fit_res(_update(100.0), 0)),  # claims no examples
        (FakeProxy(7), _fit_res(_update(100.0), 4, refused=2)),  # a refusal is never averaged in
        (FakeProxy(8), _fit_res(_update(10.0), 4)),  # L2 norm 24.5 above federation.max_update_norm 20
    ]
    new = parameters_to_ndarrays(strategy.aggregate_fit(1, results, [])[0])
    np.testing.assert_array_equal(new[0], np.full((2, 2), 3.0, np.float32))  # 1 + mean(1, 3)
    np.testing.assert_array_equal(new[1], np.full(2, -2.0, np.float32))
    refused = strategy.sites["site-3"]
    assert (refused.refused, refused.examples) == (1, 0)
    assert (refused.epsilon, refused.would_spend, refused.budget_epsilon) == (7.9, 9.5, 8.0)
    assert (strategy.sites["site-7"].refused, strategy.sites["site-7"].examples) == (2, 0)
    for name in ("site-4", "site-5", "site-6", "site-8"):
        assert strategy.sites[name].examples == 0 and strategy.sites[name].refused == 0
    assert strategy.sites["site-4"].rejected == "parameter 'b' has non-finite values"
    assert strategy.sites["site-5"].rejected == "parameter 'w': expected shape (2, 2), got (3, 2)"
    assert strategy.sites["site-6"].rejected == "no training examples"
    assert "update L2 norm 24.49 exceeds the bound 20" in strategy.sites["site-8"].rejected
    assert strategy.sites["site-1"].rejected is None and strategy.sites["site-3"].rejected is None
    assert strategy.sites["site-1"].examples == 2


def test_too_few_usable_updates_fail_the_round_with_a_clear_message():
    strategy, _ = _strategy(_config(min_sites=2), first_round=3)
    results = [(FakeProxy(1), _fit_res(_update(1.0), 2)),
               (FakeProxy(2), _fit_res(_update(0.0), 0, refused=3))]
    with pytest.raises(FederationError) as error:
        strategy.aggregate_fit(1, results, [RuntimeError("site-9 timed out")])
    message = str(error.value)
    assert message.startswith("round 3 failed: 1 site(s) sent a usable update, the minimum is 2 (federation.min_sites)")
    assert "1 failed or timed out, 1 refused" in message
    np.testing.assert_array_equal(strategy.global_arrays[0], GLOBAL[0])  # global model unchanged


def test_configure_fit_sends_the_plan_to_every_site_and_continues_round_numbers():
    config = _config(min_sites=2)
    strategy, _ = _strategy(config, first_round=4)
    manager = SimpleClientManager()
    proxies = [FakeProxy(i) for i in (11, 12, 13)]
    for proxy in proxies:
        manager.register(proxy)
    parameters = strategy.initialize_parameters(manager)
    instructions = strategy.configure_fit(2, parameters, manager)
    assert sorted(p.node_id for p, _ in instructions) == [11, 12, 13]
    for _, ins in instructions:
        plan = RoundPlan.from_config(ins.config)
        assert plan == round_plan(config, "fed-1", 5)  # server round 2 after 3 earlier rounds
        assert plan.round == 5 and plan.planned_rounds == 5 and plan.federation_id == "fed-1"
        for a, b in zip(parameters_to_ndarrays(ins.parameters), GLOBAL, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(FederationError, match="round 5 failed: secure aggregation stopped"):
        strategy.configure_evaluate(2, parameters, manager)  # no aggregate_fit: SecAgg+ halted
    strategy.aggregate_fit(2, [(p, _fit_res(_update(0.1), 5)) for p in proxies], [])
    evaluation = strategy.configure_evaluate(2, parameters, manager)
    assert len(evaluation) == 3
    assert all(RoundPlan.from_config(ins.config).round == 5 for _, ins in evaluation)


def test_fedprox_plan_and_flower_config_both_carry_mu():
    config = _config("fedprox", min_sites=1, mu=0.25)
    strategy, _ = _strategy(config)
    manager = SimpleClientManager()
    manager.register(FakeProxy(1))
    [(_, ins)] = strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)
    assert ins.config["proximal_mu"] == 0.25 and PLAN_KEY in ins.config
    assert RoundPlan.from_config(ins.config).proximal_mu == 0.25


def test_too_few_sites_online_fails_after_the_round_timeout():
    strategy, _ = _strategy(_config(min_sites=2, timeout=1.0), first_round=2)
    manager = SimpleClientManager()
    manager.register(FakeProxy(1))
    start = time.monotonic()
    with pytest.raises(FederationError) as error:
        strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert message.startswith("round 2 cannot start: 1 site(s) online after waiting 1 s, federation.min_sites is 2")
    assert "fedpath-server resume" in message


def test_aggregate_evaluate_fills_the_sites_and_hands_the_round_to_the_recorder():
    strategy, recorder = _strategy(_config(), first_round=3)
    strategy.aggregate_fit(1, [(FakeProxy(1), _fit_res(_update(4.0), 1)),
                               (FakeProxy(2), _fit_res(_update(0.0), 3, epsilon=math.nan))], [])
    loss, metrics = strategy.aggregate_evaluate(1, [
        (FakeProxy(1), _eval_res(0.5, 4, [[2, 0], [1, 1]], 0.75, epsilon=9.0)),
        (FakeProxy(2), _eval_res(1.0, 4, [[1, 1], [0, 2]], 0.25, epsilon=2.5)),
    ], [])
    assert loss == pytest.approx(0.75) and metrics == {}
    [(round_, arrays, sites, timing)] = recorder.calls
    assert round_ == 3
    np.testing.assert_array_equal(arrays[0], np.full((2, 2), 2.0, np.float32))
    first, second = sites["site-1"], sites["site-2"]
    assert (first.val_slides, first.val_loss, second.val_slides, second.val_loss) == (4, 0.5, 4, 1.0)
    np.testing.assert_array_equal(first.confusion, [[2, 0], [1, 1]])
    np.testing.assert_array_equal(second.confusion, [[1, 1], [0, 2]])
    assert first.eval["auc"] == 0.75 and not any(key.startswith("cm_") for key in first.eval)
    assert first.epsilon == 1.5  # from fit; the evaluation's value does not override it
    assert second.epsilon == 2.5  # fit reported none: taken from the evaluation
    assert first.examples == 1 and second.examples == 3
    assert set(timing) == {"round_s", "fit_phase_s", "evaluate_phase_s", "site_train_s_max"}
    assert timing["site_train_s_max"] == 2.0


def test_aggregate_evaluate_of_a_site_that_did_not_train():
    strategy, recorder = _strategy(_config())
    loss, _ = strategy.aggregate_evaluate(2, [(FakeProxy(7), _eval_res(0.0, 0, [[0, 0], [0, 0]], math.nan))], [])
    assert loss is None  # no validation slides anywhere: no loss
    [(round_, _, sites, _)] = recorder.calls
    assert round_ == 2 and list(sites) == ["site-7"]
    site = sites["site-7"]
    assert isinstance(site, SiteRound) and (site.val_slides, site.examples, site.refused) == (0, 0, 0)
    assert math.isnan(site.epsilon) and math.isnan(site.eval["auc"])
    assert strategy.evaluate(2, strategy.initialize_parameters(SimpleClientManager())) is None
