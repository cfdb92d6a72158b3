"""server.federation_strategy around real Flower strategies, with fake sites (no network, no processes):
what it reads from the sites' reply vectors, plain and as SecAgg+ hands them over."""


import numpy as np
import pytest
from flwr.app import Error, Message, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.supercore.task_identity import TaskIdentity

from server.app import round_plan
from server.federation_strategy import FederationError, FederationStrategy
from server.server_config import (
    FederationConfig,
    SecureAggregationConfig,
    ServerConfig,
    ServerOptimizerConfig,
    StrategyConfig,
)
from server.server_optimizer import ServerOptimizer, state_path
from server.strategies import build_strategy
from shared.parameters import unpack
from shared.refusals import REFUSAL_ERROR_BASE
from shared.round_plan import PLAN_KEY, RoundPlan
from shared.round_sums import CountLayout, EvaluationCounts, encode_reply

SHAPES = [("w", (2, 2)), ("b", (2,))]
GLOBAL = [np.ones((2, 2), np.float32), np.zeros(2, np.float32)]


def _model(parameters) -> list[np.ndarray]:
    """The model's tensors in what the strategy sends (one vector on the wire)."""
    arrays = parameters_to_ndarrays(parameters)
    assert len(arrays) == 1 and arrays[0].shape == (sum(int(np.prod(shape)) for _, shape in SHAPES),)
    return unpack(arrays, [shape for _, shape in SHAPES])
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


SCALE = 100
LAYOUT = CountLayout(2, 10, 1)


class FakeRecorder:
    def __init__(self) -> None:
        self.saved, self.closed, self.waiting = [], [], []

    def note_waiting(self, waiting):
        self.waiting.append(waiting)

    def save_model(self, round_, arrays, sites, timing=None, patients=0.0):
        self.saved.append((round_, [a.copy() for a in arrays], dict(sites), timing, patients))

    def close_model(self, round_, evaluation):
        self.closed.append((round_, evaluation))


def _config(strategy: str = "fedavg", min_sites: int = 2, timeout: float = 1.0, max_norm: float = 1000.0,
            mu: float = 0.01, secure: bool = False, rejoin_wait: float = 0.0) -> ServerConfig:
    return ServerConfig(classes=CLASSES, positive_class="adenocarcinoma",
                        federation=FederationConfig(rounds=5, min_sites=min_sites, round_timeout=timeout,
                                                    max_update_norm=max_norm, rejoin_wait=rejoin_wait),
                        strategy=StrategyConfig(name=strategy, proximal_mu=mu),
                        secure_aggregation=SecureAggregationConfig(enabled=secure, max_weight=SCALE,
                                                                   clipping_range=100.0))


def _strategy(config: ServerConfig, first_round: int = 1, on_sampled=None, optimizer=None, rejoining=(),
              counts_released=lambda: True):
    recorder = FakeRecorder()
    strategy = FederationStrategy(config, build_strategy(config), recorder, SHAPES, [a.copy() for a in GLOBAL],
                                  first_round=first_round, plan_for=lambda r: round_plan(config, "fed-1", r),
                                  site_name=lambda node_id: f"site-{node_id}", on_sampled=on_sampled,
                                  optimizer=optimizer, rejoining=rejoining, counts_released=counts_released)
    return strategy, recorder


def _update(value: float) -> list[np.ndarray]:
    return [np.full((2, 2), value, np.float32), np.full(2, -value, np.float32)]


def _counts(positives_scores=(), negatives_scores=()) -> np.ndarray:
    """Evaluation counts of one site: one patient per score."""
    scores = [*positives_scores, *negatives_scores]
    labels = [1] * len(positives_scores) + [0] * len(negatives_scores)
    if not scores:
        return np.zeros(LAYOUT.size)
    probs = np.array([[1 - p, p] for p in scores])
    return EvaluationCounts.from_predictions(LAYOUT, probs, labels, [str(i) for i in range(len(scores))]).vector()


def _fit_res(update, patients: int, counts=None, **disclosed) -> FitRes:
    arrays = encode_reply(update, patients, _counts() if counts is None else counts, SCALE)
    metrics = {"epsilon": 1.5, "refused": 0.0, **{k: float(v) for k, v in disclosed.items()}}
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), SCALE, metrics)


def _as_secagg(results):
    """What Flower's SecAgg+ workflow hands the strategy: every reply carries the unmasked mean."""
    vectors = [parameters_to_ndarrays(res.parameters) for _, res in results]
    mean = ndarrays_to_parameters([np.mean(parts, axis=0) for parts in zip(*vectors, strict=True)])
    return [(proxy, FitRes(res.status, mean, res.num_examples, res.metrics)) for proxy, res in results]


@pytest.mark.parametrize("secure", [False, True])
def test_server_momentum_steps_on_the_aggregate_and_keeps_its_state_beside_the_checkpoints(secure, tmp_path):
    config = _config(secure=secure)
    momentum = ServerOptimizer(ServerOptimizerConfig(name="momentum", learning_rate=1.0, momentum=0.5),
                               [shape for _, shape in SHAPES], tmp_path)
    strategy, recorder = _strategy(config, optimizer=momentum)
    for server_round in (1, 2):  # the same aggregate twice: steps of 1.0, then 1.5 (0.5 x 1.0 + 1.0)
        results = [(FakeProxy(1), _fit_res(_update(1.0), 2)), (FakeProxy(2), _fit_res(_update(1.0), 2))]
        new = _model(strategy.aggregate_fit(server_round, _as_secagg(results) if secure else results,
                                                            [])[0])
    np.testing.assert_allclose(new[0], GLOBAL[0] + 2.5, atol=1e-5)
    np.testing.assert_allclose(recorder.saved[-1][1][0], new[0])
    assert state_path(tmp_path, 2).is_file() and not state_path(tmp_path, 1).exists()


@pytest.mark.parametrize("secure", [False, True])
def test_fedavg_adds_the_patient_weighted_mean_update_and_reads_the_pooled_evaluation(secure):
    strategy, recorder = _strategy(_config(secure=secure), first_round=1)
    results = [(FakeProxy(1), _fit_res(_update(4.0), 1, _counts([0.9, 0.8], [0.1]))),
               (FakeProxy(2), _fit_res(_update(0.0), 3, _counts([0.3], [0.2, 0.7])))]
    parameters, metrics = strategy.aggregate_fit(1, _as_secagg(results) if secure else results, [])
    new = _model(parameters)
    # weights 1/4 and 3/4: mean update 1.0 for w, -1.0 for b
    np.testing.assert_allclose(new[0], np.full((2, 2), 2.0), atol=1e-5)
    np.testing.assert_allclose(new[1], np.full(2, -1.0), atol=1e-5)
    assert metrics == {}
    [(closed_round, evaluation)] = recorder.closed
    assert closed_round == 0  # round 1's replies score the model the sites received: the initial one
    # pooled over both sites: positives 0.9, 0.8, 0.3; negatives 0.1, 0.2, 0.7
    assert evaluation["accuracy"] == pytest.approx(4 / 6, abs=1e-4)
    assert evaluation["sensitivity"] == pytest.approx(2 / 3, abs=1e-4)
    assert evaluation["specificity"] == pytest.approx(2 / 3, abs=1e-4)
    assert evaluation["auc"] == pytest.approx(8 / 9, abs=1e-4)  # 8 of 9 pairs ordered, no two in one bin
    assert evaluation["val_patients"] == pytest.approx(6, abs=1e-4)
    [(round_, arrays, sites, timing, patients)] = recorder.saved
    assert round_ == 1 and patients == pytest.approx(4, abs=1e-4)
    np.testing.assert_allclose(arrays[0], new[0])
    assert sites["site-1"].value("epsilon") == 1.5 and sites["site-1"].trained
    assert set(timing) == {"round_s", "fit_phase_s", "site_train_s_max"}

    # the next round starts from the new global model
    results = [(FakeProxy(1), _fit_res(_update(1.0), 2)), (FakeProxy(2), _fit_res(_update(3.0), 2))]
    parameters, _ = strategy.aggregate_fit(2, _as_secagg(results) if secure else results, [])
    np.testing.assert_allclose(_model(parameters)[0], np.full((2, 2), 4.0), atol=1e-5)


def test_median_aggregates_the_decoded_updates_of_plain_replies():
    strategy, _ = _strategy(_config("median", min_sites=3))
    results = [(FakeProxy(1), _fit_res(_update(1.0), 90)), (FakeProxy(2), _fit_res(_update(2.0), 1)),
               (FakeProxy(3), _fit_res(_update(50.0), 1))]
    new = _model(strategy.aggregate_fit(1, results, [])[0])
    np.testing.assert_allclose(new[0], np.full((2, 2), 3.0), atol=1e-4)  # 1 + median(1, 2, 50)
    np.testing.assert_allclose(new[1], np.full(2, -2.0), atol=1e-4)


def test_refused_and_malformed_plain_replies_are_set_aside():
    strategy, _ = _strategy(_config(max_norm=20.0))
    nan_update = _update(2.0)
    nan_update[1][0] = np.nan
    results = [
        (FakeProxy(1), _fit_res(_update(1.0), 2)),
        (FakeProxy(2), _fit_res(_update(3.0), 2)),
        (FakeProxy(3), _fit_res(_update(0.0), 0, refused=1, epsilon=7.9)),
        (FakeProxy(4), _fit_res(nan_update, 5)),
        (FakeProxy(6), _fit_res(_update(0.0), 0)),  # claims no patients but no refusal
        (FakeProxy(8), _fit_res(_update(10.0), 4)),  # L2 norm 24.5 above federation.max_update_norm 20
        (FakeProxy(9), _fit_res([np.ones((3, 2)), np.ones(2)], 2)),  # another model's vector: 2 values more
    ]
    new = _model(strategy.aggregate_fit(1, results, [])[0])
    np.testing.assert_allclose(new[0], np.full((2, 2), 3.0), atol=1e-4)  # 1 + mean(1, 3), both 2 patients
    refused = strategy.sites["site-3"]
    assert refused.refused == 1 and not refused.trained and refused.value("epsilon") == 7.9
    assert strategy.sites["site-4"].rejected == "parameter 'b' has non-finite values"
    assert strategy.sites["site-6"].rejected == "no training patients"
    assert "update L2 norm 24.49 exceeds the bound 20" in strategy.sites["site-8"].rejected
    assert strategy.sites["site-9"].rejected.startswith(f"received {8 + 1 + LAYOUT.size} values, a reply has "
                                                        f"{6 + 1 + LAYOUT.size} in 3 tensors")
    assert strategy.sites["site-1"].rejected is None and strategy.sites["site-1"].trained


def test_error_replies_name_the_refusing_site(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what a ServerApp process has when it builds messages
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    strategy, _ = _strategy(_config())
    request = Message(RecordDict(), dst_node_id=5, message_type="train", group_id="1")
    reply = Message(Error(code=REFUSAL_ERROR_BASE + 9), reply_to=request)
    assert reply.metadata.src_node_id == 5
    strategy.observe([reply])
    assert strategy.sites["site-5"].refused == 9 and not strategy.sites["site-5"].trained


def test_too_few_usable_updates_fail_the_round_with_a_clear_message():
    strategy, recorder = _strategy(_config(min_sites=2), first_round=3)
    results = [(FakeProxy(1), _fit_res(_update(1.0), 2)),
               (FakeProxy(2), _fit_res(_update(0.0), 0, refused=3))]
    with pytest.raises(FederationError) as error:
        strategy.aggregate_fit(1, results, [RuntimeError("site-9 timed out")])
    message = str(error.value)
    assert message.startswith("round 3 failed: 1 site(s) sent a usable update, the minimum is 2 (federation.min_sites)")
    assert "1 failed or timed out, 1 refused" in message
    assert "spare_rounds" not in message  # nobody is out of budget
    np.testing.assert_array_equal(strategy.global_arrays[0], GLOBAL[0])  # global model unchanged
    assert recorder.saved == []
    # sites out of budget (e.g. a round redone after a crash): the message says why and what plans room for it
    strategy, _ = _strategy(_config(min_sites=2), first_round=3)
    spent = [(FakeProxy(node), _fit_res(_update(0.0), 0, refused=1)) for node in (1, 2)]
    with pytest.raises(FederationError, match=r"0 failed or timed out, 2 refused\. .* 2 site\(s\) are out of "
                                              r"privacy budget: a round redone after a crash .*spare_rounds"):
        strategy.aggregate_fit(1, spent, [])


def test_the_last_exchange_only_scores_the_final_model():
    strategy, recorder = _strategy(_config(), first_round=6)  # rounds: 5, so round 6 is the scoring exchange
    results = [(FakeProxy(1), _fit_res([], 0, _counts([0.9], [0.1]))),  # no update: only the counts
               (FakeProxy(2), _fit_res([], 0, _counts([0.2], [0.4])))]
    parameters, _ = strategy.aggregate_fit(1, results, [])
    np.testing.assert_array_equal(_model(parameters)[0], GLOBAL[0])
    assert recorder.saved == [] and recorder.closed[0][0] == 5
    assert recorder.closed[0][1]["accuracy"] == pytest.approx(0.75, abs=1e-4)


def test_a_secagg_round_whose_sites_released_no_counts_records_the_model_as_not_scored():
    """Under SecAgg+ the sites release their counts only when every site offered them; when one did not, the
    sum's counts are zeros, which the server must not record as a score (accuracy nan, 0 patients)."""
    released = [True]
    strategy, recorder = _strategy(_config(secure=True), counts_released=lambda: released[0])
    results = [(FakeProxy(1), _fit_res(_update(1.0), 2)), (FakeProxy(2), _fit_res(_update(1.0), 2))]
    released[0] = False
    parameters, _ = strategy.aggregate_fit(1, _as_secagg(results), [])
    np.testing.assert_allclose(_model(parameters)[0], GLOBAL[0] + 1.0, atol=1e-5)  # the update is summed as ever
    assert recorder.closed == [(0, None)]
    released[0] = True
    strategy.aggregate_fit(2, _as_secagg(results), [])
    assert recorder.closed[1][0] == 1 and recorder.closed[1][1] is not None


def test_configure_fit_sends_the_plan_tells_the_round_size_and_continues_round_numbers():
    config = _config(min_sites=2)
    sizes = []
    strategy, _ = _strategy(config, first_round=4, on_sampled=sizes.append)
    manager = SimpleClientManager()
    proxies = [FakeProxy(i) for i in (11, 12, 13)]
    for proxy in proxies:
        manager.register(proxy)
    parameters = strategy.initialize_parameters(manager)
    instructions = strategy.configure_fit(2, parameters, manager)
    assert sorted(p.node_id for p, _ in instructions) == [11, 12, 13] and sizes == [3]
    for _, ins in instructions:
        plan = RoundPlan.from_config(ins.config)
        assert plan == round_plan(config, "fed-1", 5)  # server round 2 after 3 earlier rounds
        assert plan.round == 5 and plan.planned_rounds == 5 and plan.train and plan.evaluate
        assert plan.evaluations == 6 and plan.weight_scale == SCALE  # 5 rounds + the final scoring
        for a, b in zip(_model(ins.parameters), GLOBAL, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(FederationError, match="round 5 failed: secure aggregation stopped"):
        strategy.configure_evaluate(2, parameters, manager)  # no aggregate_fit: SecAgg+ halted
    strategy.aggregate_fit(2, [(p, _fit_res(_update(0.1), 5)) for p in proxies], [])
    assert strategy.configure_evaluate(2, parameters, manager) == []  # evaluation rides in training
    assert not round_plan(config, "fed-1", 6).train and round_plan(config, "fed-1", 6).evaluate


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
    with pytest.raises(FederationError) as error:  # (Flower's own wait_for, bounded by the 1 s timeout)
        strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)
    message = str(error.value)
    assert message.startswith("round 2 cannot start: 1 site(s) online after waiting 1 s, federation.min_sites is 2")
    assert "fedpath-server resume" in message
    assert strategy.evaluate(2, strategy.initialize_parameters(SimpleClientManager())) is None


class FakeClock:
    """The strategy's clock, advanced by its own sleeps: a site listed online at a virtual moment, and how long
    the strategy waited, without real time in the test."""

    def __init__(self, arrivals: list[tuple[float, SimpleClientManager, ClientProxy]] = ()) -> None:
        self.start = self.now = 1000.0
        self.arrivals = sorted(arrivals, key=lambda a: a[0])

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds
        while self.arrivals and self.arrivals[0][0] <= self.waited:
            _, manager, proxy = self.arrivals.pop(0)
            manager.register(proxy)  # its heartbeat after a restart

    @property
    def waited(self) -> float:
        return self.now - self.start


@pytest.fixture
def clock(monkeypatch):
    import server.federation_strategy

    fake = FakeClock()
    monkeypatch.setattr(server.federation_strategy, "time", fake)
    return fake


def test_a_resumed_run_waits_for_the_sites_of_its_last_round_before_sampling(caplog, clock):
    # site-3 took part in the checkpoint's round; after the restart it is listed online 0.5 s after the others
    strategy, recorder = _strategy(_config(min_sites=2, rejoin_wait=20.0), first_round=3,
                                   rejoining={"site-1", "site-2", "site-3"})
    manager = SimpleClientManager()
    for node in (1, 2):
        manager.register(FakeProxy(node))
    clock.arrivals = [(0.5, manager, FakeProxy(3))]
    with caplog.at_level("INFO", logger="fedpath.server"):
        instructions = strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)
    assert sorted(p.node_id for p, _ in instructions) == [1, 2, 3]  # sampled with site-3, not before it came
    assert 0.5 <= clock.waited <= 1.0  # until it came (asked every REJOIN_POLL_S), not the whole 20 s
    message = "round 3 waits up to 20 s (federation.rejoin_wait) for site-3 of the last round to be online"
    assert message in caplog.text
    assert recorder.waiting == [message, None]  # shown by `fedpath-server status` while it waits


def test_a_site_that_does_not_come_back_costs_the_round_rejoin_wait_once(caplog, clock):
    strategy, _ = _strategy(_config(min_sites=2, rejoin_wait=0.6), first_round=3,
                            rejoining={"site-1", "site-2", "site-3"})
    manager = SimpleClientManager()
    proxies = [FakeProxy(node) for node in (1, 2)]
    for proxy in proxies:
        manager.register(proxy)
    with caplog.at_level("INFO", logger="fedpath.server"):
        instructions = strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)
    assert clock.waited == pytest.approx(0.6)  # the whole rejoin_wait, no more
    assert sorted(p.node_id for p, _ in instructions) == [1, 2]
    assert "round 3 starts without site-3: not online within federation.rejoin_wait (0.6 s)" in caplog.text
    # the next round expects the sites of this one: site-3 is no longer waited for
    strategy.aggregate_fit(1, [(p, _fit_res(_update(0.1), 5)) for p in proxies], [])
    assert len(strategy.configure_fit(2, strategy.initialize_parameters(manager), manager)) == 2
    assert clock.waited == pytest.approx(0.6)


def test_within_a_run_a_site_of_the_last_round_that_went_offline_is_waited_for(clock):
    strategy, _ = _strategy(_config(min_sites=2, rejoin_wait=20.0))
    manager = SimpleClientManager()
    proxies = [FakeProxy(node) for node in (1, 2, 3)]
    for proxy in proxies:
        manager.register(proxy)
    strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)
    strategy.aggregate_fit(1, [(p, _fit_res(_update(0.1), 5)) for p in proxies], [])
    manager.unregister(proxies[2])  # its SuperNode lost the connection between the rounds
    clock.arrivals = [(clock.waited + 0.5, manager, proxies[2])]
    instructions = strategy.configure_fit(2, strategy.initialize_parameters(manager), manager)
    assert sorted(p.node_id for p, _ in instructions) == [1, 2, 3]
    assert 0.5 <= clock.waited <= 1.0


def test_rejoin_wait_zero_samples_whoever_is_online(clock):
    strategy, _ = _strategy(_config(min_sites=2, rejoin_wait=0.0), rejoining={"site-1", "site-2", "site-3"})
    manager = SimpleClientManager()
    for node in (1, 2):
        manager.register(FakeProxy(node))
    assert len(strategy.configure_fit(1, strategy.initialize_parameters(manager), manager)) == 2
    assert clock.waited == 0
