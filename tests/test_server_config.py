"""server.yaml: defaults, resolved paths, refusals with their messages; the Flower strategy and round plan from it."""

from pathlib import Path

import numpy as np
import pytest
from flwr.server.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum

from server.app import initial_model, round_plan
from server.server_config import SecureAggregationConfig, ServerConfig, load_server_config
from server.strategies import build_strategy
from shared.model import ModelConfig, build_head
from shared.round_plan import PrivacyTarget, RoundPlan
from shared.yaml_config import ConfigError

CLASSES = "classes: [adenoma, adenocarcinoma]\n"
NO_SECAGG = "secure_aggregation:\n  enabled: false\n"  # per-update rules need every update


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "consortium" / "server.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _load(tmp_path: Path, text: str) -> ServerConfig:
    return load_server_config(_write(tmp_path, text))


def _refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as error:
        _load(tmp_path, text)
    message = str(error.value)
    assert message.startswith("invalid configuration:")
    assert "server.yaml" in message  # names the file
    return message


def test_defaults_and_paths_beside_server_yaml(tmp_path):
    path = _write(tmp_path, CLASSES)
    config = load_server_config(path)
    base = path.parent.resolve()
    assert config.classes == ("adenoma", "adenocarcinoma")
    assert config.name == "fedpath consortium" and config.positive_class is None
    assert config.superlink.address == "127.0.0.1:9092" and config.superlink.public_address is None
    assert config.superlink.loopback == 9093 and config.superlink.loopback_address == "127.0.0.1:9093"
    assert config.superlink.max_request_mb == 64
    assert config.superlink.state_dir == base / "state"
    assert config.superlink.certs_dir == base / "certs"
    assert config.results_dir == base / "runs"
    assert (config.federation.rounds, config.federation.min_sites, config.federation.fraction) == (5, 2, 1.0)
    assert config.federation.round_timeout == 600.0 and config.federation.best_metric == "auc"
    assert config.federation.rejoin_wait == 30.0
    assert config.strategy.name == "fedavg" and config.strategy.proximal_mu == 0.01
    assert config.model == ModelConfig()
    assert (config.training.epochs, config.training.batch_size, config.training.sequence_length) == (1, 16, 8)
    assert config.privacy == PrivacyTarget(required=True, epsilon=8.0, delta=1e-5)
    assert config.federation.max_update_norm == 10.0 and config.federation.wire_log is False
    assert config.secure_aggregation == SecureAggregationConfig(enabled=True, reconstruction_threshold="majority",
                                                                clipping_range=1.0, max_weight=1000)


def test_relative_and_absolute_paths_are_resolved(tmp_path):
    absolute = tmp_path / "elsewhere" / "certs"
    config = _load(tmp_path, CLASSES + f"superlink:\n  state_dir: var/state\n  certs_dir: {absolute}\n"
                                       "  port: 9500\n  host: 0.0.0.0\nresults_dir: ../results\n")
    base = (tmp_path / "consortium").resolve()
    assert config.superlink.state_dir == base / "var" / "state"
    assert config.superlink.certs_dir == absolute
    assert config.results_dir == base / ".." / "results"
    assert config.superlink.address == "0.0.0.0:9500"
    assert config.superlink.loopback_address == "127.0.0.1:9501"  # the SuperLink never listens beyond loopback


def test_settings_are_read(tmp_path):
    config = _load(tmp_path, CLASSES + NO_SECAGG + "positive_class: adenocarcinoma\nfederation:\n  rounds: 3\n"
                             "  min_sites: 3\n"
                                       "  best_metric: accuracy\n  round_timeout: 1\nstrategy:\n  name: median\n"
                                       "training:\n  epochs: 2\n  batch_size: 4\nprivacy:\n  epsilon: 3\n")
    assert config.positive_class == "adenocarcinoma"
    assert (config.federation.rounds, config.federation.min_sites, config.federation.best_metric) == (3, 3, "accuracy")
    assert config.federation.round_timeout == 1.0 and isinstance(config.federation.round_timeout, float)
    assert config.strategy.name == "median" and config.training.epochs == 2 and config.privacy.epsilon == 3.0


@pytest.mark.parametrize("text, message", [
    ("classes: [adenoma]\n", "server.yaml:1: classes: need at least two distinct class names, got ['adenoma']"),
    ("classes: [adenoma, adenoma]\n", "classes: need at least two distinct class names, got ['adenoma', 'adenoma']"),
    (CLASSES + "positive_class: carcinoma\n",
     "server.yaml:2: positive_class: 'carcinoma' is not one of classes ['adenoma', 'adenocarcinoma']"),
    (CLASSES + "model:\n  trainable: last_block\n",
     "server.yaml:3: model.trainable: last_block needs model.trunk_sha256"),
    (CLASSES + NO_SECAGG + "strategy:\n  name: krum\n  krum_malicious: 1\nfederation:\n  min_sites: 4\n",
     "server.yaml:8: federation.min_sites: must be >= 5 for strategy krum with krum_malicious=1"),
    (CLASSES + NO_SECAGG + "strategy:\n  name: krum\n",
     "federation.min_sites: must be >= 3 for strategy krum with krum_malicious=0"),
    (CLASSES + "strategy:\n  name: median\n",
     "server.yaml:3: strategy.name: median needs every site's update, but secure_aggregation shows the server "
     "only their sum"),
    (CLASSES + "federation:\n  min_sites: 1\n",
     "server.yaml:3: federation.min_sites: must be at least 2 with secure_aggregation"),
    (CLASSES + "federation:\n  min_sites: 4\nsecure_aggregation:\n  reconstruction_threshold: 2\n",
     "server.yaml:5: secure_aggregation.reconstruction_threshold: 2 is below a strict majority of "
     "federation.min_sites (4)"),
    (CLASSES + "secure_aggregation:\n  reconstruction_threshold: 0\n",
     "must be 'majority' or a number of sites >= 1"),
    (CLASSES + "secure_aggregation:\n  clipping_range: 0.001\n",
     "server.yaml:3: secure_aggregation.clipping_range: so small"),
    (CLASSES + "superlink:\n  host: '127.0.0.1; listen 80'\n",  # it goes into nginx's listen directive
     "superlink.host: must be an IP address or a host name"),
    (CLASSES + "federation:\n  max_update_norm: 0\n",
     "federation.max_update_norm: must be a finite number > 0 (got 0)"),
    (CLASSES + "strategy:\n  name: trimmed_mean\n  trim_beta: 0.5\n",
     "strategy.trim_beta: must be in [0, 0.5) (got 0.5)"),
    (CLASSES + "federaton:\n  rounds: 3\n",
     "server.yaml:2: federaton: unknown setting (did you mean 'federation'?)"),
    (CLASSES + "federation:\n  round: 3\n",
     "server.yaml:3: federation.round: unknown setting (did you mean 'rounds'?)"),
    (CLASSES + "superlink:\n  port: 70000\n",
     "server.yaml:3: superlink.port: must be a TCP port (1-65535) (got 70000)"),
    (CLASSES + "superlink:\n  port: 0\n", "superlink.port: must be a TCP port (1-65535) (got 0)"),
    (CLASSES + "superlink:\n  port: http\n", "superlink.port: expected an integer, got 'http'"),
    (CLASSES + "superlink:\n  port: 9092\n  loopback_port: 9092\n",
     "server.yaml:4: superlink.loopback_port: must differ from superlink.port (9092)"),
    (CLASSES + "superlink:\n  loopback_port: 9092\n",  # the default port
     "server.yaml:3: superlink.loopback_port: must differ from superlink.port (9092)"),
    (CLASSES + "superlink:\n  port: 65535\n",  # no loopback_port line: the section's
     "server.yaml:2: superlink.loopback_port: port 65535 leaves no default (port + 1): set superlink.loopback_port"),
    (CLASSES + "superlink:\n  loopback_port: 0\n", "superlink.loopback_port: must be a TCP port (1-65535) (got 0)"),
    (CLASSES + "superlink:\n  max_request_mb: 0\n", "superlink.max_request_mb: must be in 1-2048 (got 0)"),
    (CLASSES + "superlink:\n  pull_hold_s: 30\n",
     "server.yaml:3: superlink.pull_hold_s: must be in 0-20 (seconds) (got 30)"),
    (CLASSES + "strategy:\n  name: fedsgd\n", "strategy.name: must be one of 'fedavg', 'fedprox', 'median'"),
    (CLASSES + "federation:\n  fraction: 0\n", "federation.fraction: must be in (0, 1] (got 0)"),
    (CLASSES + "federation:\n  rejoin_wait: -1\n", "server.yaml:3: federation.rejoin_wait: must be >= 0 (got -1)"),
])
def test_refusals_name_the_problem(tmp_path, text, message):
    assert message in _refused(tmp_path, text)


def test_krum_with_enough_sites_is_accepted(tmp_path):
    config = _load(tmp_path, CLASSES + NO_SECAGG + "strategy:\n  name: krum\n  krum_malicious: 1\n"
                             "federation:\n  min_sites: 5\n")
    assert config.strategy.krum_malicious == 1 and config.federation.min_sites == 5


def test_all_problems_are_reported_at_once(tmp_path):
    message = _refused(tmp_path, CLASSES + "superlink:\n  port: 0\nfederation:\n  rounds: 0\n")
    assert "superlink.port" in message and "federation.rounds: must be between 1 and 99,000 (got 0)" in message


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_server_config(tmp_path / "nope.yaml")


# build_strategy -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy, cls", [
    ("name: fedavg", FedAvg), ("name: fedprox\n  proximal_mu: 0.3", FedProx), ("name: median", FedMedian),
    ("name: trimmed_mean\n  trim_beta: 0.25", FedTrimmedAvg),
    ("name: krum\n  krum_malicious: 1\n  krum_keep: 2", Krum),
])
def test_build_strategy_returns_the_flower_class(tmp_path, strategy, cls):
    config = _load(tmp_path, CLASSES + NO_SECAGG + f"federation:\n  min_sites: 5\n  fraction: 0.5\n"
                                                   f"strategy:\n  {strategy}\n")
    built = build_strategy(config)
    assert type(built) is cls
    assert built.min_fit_clients == 5 and built.min_available_clients == 5 and built.fraction_fit == 0.5
    assert built.fit_metrics_aggregation_fn([(1, {"a": 1.0})]) == {}  # fedpath pools the metrics itself
    if cls is FedProx:
        assert built.proximal_mu == 0.3
    if cls is FedTrimmedAvg:
        assert built.beta == 0.25
    if cls is Krum:
        assert (built.num_malicious_clients, built.num_clients_to_keep) == (1, 2)


# server.app: round plan and initial model ----------------------------------------------------------------------

def test_round_plan_carries_the_config(tmp_path):
    config = _load(tmp_path, CLASSES + "positive_class: adenocarcinoma\nfederation:\n  rounds: 4\n"
                                       "model:\n  core: gru\n  projection: 16\n  hidden: 8\n"
                                       "training:\n  epochs: 3\n  batch_size: 5\n  learning_rate: 0.02\n"
                                       "  sequence_length: 6\n  seed: 9\nprivacy:\n  epsilon: 4\n  delta: 1.0e-6\n"
                                       "secure_aggregation:\n  clipping_range: 0.5\n  max_weight: 200\n")
    plan = round_plan(config, "20260101-000000", 2)
    assert plan == RoundPlan(federation_id="20260101-000000", round=2, planned_rounds=4,
                             classes=("adenoma", "adenocarcinoma"), positive_class="adenocarcinoma",
                             model=ModelConfig(core="gru", projection=16, hidden=8), sequence_length=6, epochs=3,
                             batch_size=5, learning_rate=0.02, proximal_mu=0.0, seed=9,
                             privacy=PrivacyTarget(required=True, epsilon=4.0, delta=1e-6), max_update_norm=10.0,
                             secagg_clipping_range=0.5, weight_scale=200, train=True, evaluate=True, evaluations=5,
                             evaluation_bins=10)
    assert RoundPlan.from_config(plan.to_config()) == plan
    assert not round_plan(config, "f", 5).train and round_plan(config, "f", 5).evaluate  # the scoring-only exchange
    plain = round_plan(_load(tmp_path, CLASSES + NO_SECAGG + "federation:\n  max_update_norm: 3\n"), "f", 1)
    assert (plain.max_update_norm, plain.secagg_clipping_range, plain.weight_scale) == (3.0, None, 1000)
    sparse = _load(tmp_path, CLASSES + "federation:\n  rounds: 5\n  evaluate_every: 2\n")
    assert [round_plan(sparse, "f", r).evaluate for r in range(1, 7)] == [True, False, True, False, True, True]
    assert round_plan(sparse, "f", 1).evaluations == 4
    # a spare round: the sites plan their budget for one more round and one more evaluation; the run's
    # rounds, and which of them train and score, stay the same
    spare = _load(tmp_path, CLASSES + "federation:\n  rounds: 4\n  spare_rounds: 1\n")
    plans = [round_plan(spare, "f", r) for r in (1, 4, 5)]
    assert [(p.planned_rounds, p.evaluations, p.train, p.evaluate) for p in plans] == [
        (5, 6, True, True), (5, 6, True, True), (5, 6, False, True)]
    with pytest.raises(ConfigError, match=r"server.yaml:3: federation.spare_rounds: must be between 0 and 1,000"):
        _load(tmp_path, CLASSES + "federation:\n  spare_rounds: -1\n")


def test_the_reconstruction_threshold_is_a_strict_majority_of_each_round(tmp_path):
    default = _load(tmp_path, CLASSES).secure_aggregation
    assert [default.threshold_for(n) for n in (2, 3, 4, 5, 10, 64)] == [2, 2, 3, 3, 6, 33]
    higher = _load(tmp_path, CLASSES + "federation:\n  min_sites: 4\n"
                             "secure_aggregation:\n  reconstruction_threshold: 4\n")
    assert [higher.secure_aggregation.threshold_for(n) for n in (4, 10)] == [4, 6]  # never below a majority
    weak = _load(tmp_path, CLASSES + "secure_aggregation:\n  reconstruction_threshold: 1\n"
                           "  allow_weak_threshold: true\n")
    assert weak.secure_aggregation.threshold_for(5) == 1  # the admin's loud override (sites refuse it)


@pytest.mark.parametrize("name, expected_mu", [("fedprox", 0.05), ("fedavg", 0.0), ("median", 0.0)])
def test_round_plan_carries_proximal_mu_only_for_fedprox(tmp_path, name, expected_mu):
    config = _load(tmp_path, CLASSES + NO_SECAGG + f"strategy:\n  name: {name}\n  proximal_mu: 0.05\n")
    assert round_plan(config, "f", 1).proximal_mu == expected_mu


def test_initial_model_is_the_seeded_configured_head(tmp_path):
    config = _load(tmp_path, CLASSES + "model:\n  projection: 8\n  hidden: 4\ntraining:\n  seed: 3\n")
    first, again = initial_model(config), initial_model(config)
    head = build_head(config.model, 2)
    assert list(first) == list(head.state_dict())
    assert [a.shape for a in first.values()] == [tuple(t.shape) for t in head.state_dict().values()]
    for a, b in zip(first.values(), again.values(), strict=True):
        np.testing.assert_array_equal(a, b)
    other = initial_model(_load(tmp_path, CLASSES + "model:\n  projection: 8\n  hidden: 4\ntraining:\n  seed: 4\n"))
    assert any(not np.array_equal(a, b) for a, b in zip(first.values(), other.values(), strict=True))
