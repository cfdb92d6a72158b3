"""shared.round_plan (the server's instruction as JSON) and shared.parameters (the wire format)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.model import ModelConfig, SequenceHead
from shared.parameters import (
    ParameterMismatch,
    add,
    check_shapes,
    load_arrays,
    model_arrays,
    pack,
    subtract,
    unpack,
    update_problem,
)
from shared.refusals import REFUSALS, InvalidFederationId
from shared.round_plan import PLAN_KEY, PrivacyTarget, RoundPlan
from shared.yaml_config import ConfigError


def _plan(**changes) -> RoundPlan:
    values = dict(federation_id="20260101-000000", round=3, planned_rounds=5, classes=("adenoma", "adenocarcinoma"),
                  positive_class="adenocarcinoma", model=ModelConfig(core="gru", projection=16, hidden=8),
                  sequence_length=4, epochs=2, batch_size=3, learning_rate=0.01, proximal_mu=0.1, seed=7,
                  privacy=PrivacyTarget(required=False, epsilon=2.5, delta=1e-6))
    values.update(changes)
    return RoundPlan(**values)


# RoundPlan ---------------------------------------------------------------------------------------------------

def test_plan_round_trips_through_the_flower_config():
    plan = _plan()
    config = plan.to_config()
    assert list(config) == [PLAN_KEY] and isinstance(config[PLAN_KEY], str)  # Flower configs hold scalars
    document = json.loads(config[PLAN_KEY])
    assert document["classes"] == ["adenoma", "adenocarcinoma"] and document["model"]["core"] == "gru"
    back = RoundPlan.from_config(config)
    assert back == plan
    assert isinstance(back.classes, tuple) and isinstance(back.model, ModelConfig)
    assert isinstance(back.privacy, PrivacyTarget) and back.privacy.epsilon == 2.5


def test_plan_defaults_round_trip_and_other_config_keys_are_ignored():
    plan = RoundPlan(federation_id="f")
    back = RoundPlan.from_config({**plan.to_config(), "proximal_mu": 0.5, "other": 1})
    assert back == plan
    assert back.positive_class is None and back.proximal_mu == 0.0 and back.privacy.required is True


@pytest.mark.parametrize("change, said", [
    ({"epochs": 10**12}, "epochs: must be between 1 and 1,000"),
    ({"batch_size": 0}, "batch_size: must be between 1 and 1,000,000"),
    ({"sequence_length": 10**9}, "sequence_length: must be between 1 and 100,000"),
    ({"evaluation_bins": 2**40}, "evaluation_bins: must be an even number from 2 to 1,000"),
    ({"evaluations": 10**9}, "evaluations: must be between 0 and 1,000,000"),
    ({"weight_scale": 10**12}, "weight_scale: must be between 1 and 1,000,000,000"),
    ({"learning_rate": float("inf")}, "learning_rate: must be a finite number > 0"),
    ({"learning_rate": 10**400}, "learning_rate: must be a finite number, got an integer of 401 digits"),
    ({"secagg_clipping_range": float("nan")}, "secagg_clipping_range: must be a finite number > 0"),
    ({"secagg_clipping_range": -1.0}, "secagg_clipping_range: must be a finite number > 0"),
    ({"model": ModelConfig(projection=10**7)}, "model.projection: must be between 1 and 65,536"),
])
def test_a_plan_asking_more_of_the_site_than_any_honest_server_would_is_refused(change, said):
    """The site's machine is the hospital's: a server cannot make it train for ever, allocate a 2^40-bin
    histogram or clip against NaN (JSON carries Infinity and NaN, and json.loads reads them)."""
    config = _plan(**change).to_config()
    with pytest.raises(ConfigError, match=said.replace("(", r"\(").replace(")", r"\)")):
        RoundPlan.from_config(config)


def test_the_servers_own_config_has_the_sites_bounds(tmp_path):
    from server.server_config import load_server_config

    path = tmp_path / "server.yaml"
    path.write_text("classes: [a, b]\ntraining: {epochs: 5000}\n")
    with pytest.raises(ConfigError, match="training.epochs: must be between 1 and 1,000"):
        load_server_config(path)


def test_plan_missing_from_the_config_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=f"carries no '{PLAN_KEY}': is the server a fedpath server"):
        RoundPlan.from_config({"proximal_mu": 0.1})


@pytest.mark.parametrize("key, value, message", [
    ("epochs", 0, "epochs: must be between 1 and 1,000 (got 0)"),
    ("round", 0, "round: must be >= 1 (got 0)"),
    ("batch_size", -2, "batch_size: must be between 1 and 1,000,000 (got -2)"),
    ("learning_rate", 0.0, "learning_rate: must be a finite number > 0"),
    ("proximal_mu", -0.1, "proximal_mu: must be between 0 and 1,000,000"),
    ("epochs", "two", "epochs: expected an integer, got 'two'"),
])
def test_invalid_plan_values_are_refused_naming_the_key(key, value, message):
    document = json.loads(_plan().to_config()[PLAN_KEY])
    document[key] = value
    with pytest.raises(ConfigError) as error:
        RoundPlan.from_config({PLAN_KEY: json.dumps(document)})
    assert "round plan from the server" in str(error.value)
    assert message in str(error.value)


def test_invalid_nested_privacy_and_model_and_unknown_keys_are_refused():
    document = json.loads(_plan().to_config()[PLAN_KEY])
    document["privacy"]["delta"] = 1.5
    document["model"]["mode"] = "pixels"
    document["epoch"] = 1
    with pytest.raises(ConfigError) as error:
        RoundPlan.from_config({PLAN_KEY: json.dumps(document)})
    text = str(error.value)
    assert "privacy.delta: must be between 0 and 1 (exclusive) (got 1.5)" in text
    assert "model.mode: must be one of 'tiles', 'grid', got 'pixels'" in text
    assert "epoch: unknown setting (did you mean 'epochs'?)" in text


def test_a_plan_without_federation_id_is_refused():
    document = json.loads(_plan().to_config()[PLAN_KEY])
    del document["federation_id"]
    with pytest.raises(InvalidFederationId, match="federation_id None"):
        RoundPlan.from_config({PLAN_KEY: json.dumps(document)})


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "..", ".hidden", "a/b", "", "x" * 65, 7, "fed\n", "a\nb"])
def test_a_federation_id_that_could_name_a_path_is_refused(bad):
    document = json.loads(_plan().to_config()[PLAN_KEY])
    document["federation_id"] = bad
    with pytest.raises(InvalidFederationId):
        RoundPlan.from_config({PLAN_KEY: json.dumps(document)})


@pytest.mark.parametrize("document", ["[1, 2]", "\"fed\"", "7", "null"])
def test_a_plan_that_is_not_an_object_is_an_invalid_federation_id_not_a_crash(document):
    with pytest.raises(InvalidFederationId, match="federation_id None"):
        RoundPlan.from_config({PLAN_KEY: document})


def test_refusal_codes_are_numbered_and_explained():
    assert REFUSALS[0] is None
    assert sorted(REFUSALS) == list(range(len(REFUSALS))) and len(REFUSALS) >= 6
    assert all(isinstance(REFUSALS[code], str) and REFUSALS[code] for code in range(1, len(REFUSALS)))


# shared.parameters -------------------------------------------------------------------------------------------

def _head(seed: int) -> SequenceHead:
    torch.manual_seed(seed)
    return SequenceHead(2, "rnn", input_dim=6, projection=4, hidden=3)


def test_model_arrays_follow_state_dict_order_as_float32_copies():
    head = _head(0)
    arrays = model_arrays(head)
    state = head.state_dict()
    assert list(arrays) == list(state)
    assert len(arrays) >= 4
    for array, tensor in zip(arrays.values(), state.values(), strict=True):
        assert array.dtype == np.float32 and array.shape == tuple(tensor.shape)
        np.testing.assert_array_equal(array, tensor.numpy())
    first = next(iter(arrays))
    arrays[first][...] = 123.0  # a copy: the model is untouched
    assert not torch.any(head.state_dict()[first] == 123.0)


def test_load_arrays_round_trip_between_models():
    source, target = _head(0), _head(1)
    wire = list(model_arrays(source).values())
    assert any(not np.array_equal(a, b) for a, b in zip(wire, model_arrays(target).values(), strict=True))
    load_arrays(target, wire)
    for a, b in zip(wire, model_arrays(target).values(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(source(x), target(x))


def test_check_shapes_names_the_wrong_parameter():
    expected = [("projection.weight", (4, 6)), ("projection.bias", (4,)), ("classifier.weight", (2, 3))]
    good = [np.zeros((4, 6)), np.zeros(4), np.zeros((2, 3))]
    check_shapes(expected, good)  # no error
    wrong = [np.zeros((4, 6)), np.zeros(4), np.zeros((3, 3))]
    with pytest.raises(ParameterMismatch, match=r"parameter 'classifier.weight': expected shape \(2, 3\), "
                                                r"got \(3, 3\)"):
        check_shapes(expected, wrong)
    with pytest.raises(ParameterMismatch, match="expected 3 parameter arrays, got 2"):
        check_shapes(expected, good[:2])
    with pytest.raises(ParameterMismatch, match="expected 3 parameter arrays, got 4"):
        check_shapes(expected, good + [np.zeros(1)])


def test_the_wire_packs_the_tensors_into_one_vector_and_unpacks_them_by_shape():
    tensors = [np.arange(24, dtype=np.float64).reshape(4, 6), np.full(4, -1.5), np.ones((2, 3), np.float32)]
    (vector,) = pack(tensors)
    assert vector.dtype == np.float32 and vector.shape == (34,)
    back = unpack([vector], [(4, 6), (4,), (2, 3)])
    assert [a.shape for a in back] == [(4, 6), (4,), (2, 3)]
    assert all(np.array_equal(a, b) for a, b in zip(back, tensors, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(unpack(tensors, [(4, 6), (4,), (2, 3)]), tensors, strict=True))
    assert pack([]) == [] and unpack([], []) == []
    with pytest.raises(ParameterMismatch, match="received 34 values, the model has 35 in 3 tensors"):
        unpack([vector], [(4, 6), (5,), (2, 3)])


def test_load_arrays_refuses_a_mismatch_and_leaves_the_model_unchanged():
    head = _head(0)
    before = model_arrays(head)
    arrays = [np.full_like(a, 5.0) for a in before.values()]
    name, first = next(iter(before.items()))
    arrays[0] = np.zeros((first.shape[0] + 1, *first.shape[1:]), np.float32)
    with pytest.raises(ParameterMismatch, match=f"parameter '{name}'"):
        load_arrays(head, arrays)
    with pytest.raises(ParameterMismatch, match=f"expected {len(before)} parameter arrays, got {len(before) - 1}"):
        load_arrays(head, list(before.values())[:-1])
    for a, b in zip(before.values(), model_arrays(head).values(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_add_and_subtract_are_elementwise_float32_inverses():
    new = [np.array([[1.5, 2.0], [3.0, -4.0]], np.float64), np.array([0.25], np.float32)]
    old = [np.array([[0.5, 2.0], [1.0, 1.0]], np.float32), np.array([1.0], np.float64)]
    update = subtract(new, old)
    assert [u.dtype for u in update] == [np.float32, np.float32]
    np.testing.assert_array_equal(update[0], [[1.0, 0.0], [2.0, -5.0]])
    np.testing.assert_array_equal(update[1], [-0.75])
    back = add(old, update)
    assert [b.dtype for b in back] == [np.float32, np.float32]
    for b, n in zip(back, new, strict=True):
        np.testing.assert_array_equal(b, n.astype(np.float32))


def test_update_problem_names_what_is_wrong():
    expected = [("w", (2, 2)), ("b", (2,))]
    good = [np.full((2, 2), 0.5, np.float32), np.array([0.5, -0.5], np.float32)]  # L2 norm sqrt(1.5)
    assert update_problem(expected, good, max_norm=1.3) is None
    assert update_problem(expected, good, max_norm=1.3, value_range=0.5) is None
    assert update_problem(expected, good[:1], 10.0) == "expected 2 parameter arrays, got 1"
    assert "parameter 'b': expected shape (2,), got (3,)" in update_problem(expected, [good[0], np.zeros(3)], 10.0)
    nan = [good[0], np.array([0.0, np.inf], np.float32)]
    assert update_problem(expected, nan, 10.0) == "parameter 'b' has non-finite values"
    assert "update L2 norm 1.225 exceeds the bound 1.2" in update_problem(expected, good, max_norm=1.2)
    assert "largest update value 0.5 is outside secure aggregation's range ±0.25" in update_problem(
        expected, good, max_norm=10.0, value_range=0.25)


@pytest.mark.parametrize("extreme", [
    {},  # the defaults
    {"federation": {"rounds": 99_000, "spare_rounds": 1_000}, "training": {"epochs": 1_000, "batch_size": 1_000_000,
                                                                          "sequence_length": 100_000},
     "strategy": {"name": "fedprox", "proximal_mu": 1_000_000}, "secure_aggregation": {"max_weight": 10**9},
     "model": {"projection": 65_536, "hidden": 65_536}},
])
def test_every_plan_a_valid_server_yaml_makes_is_one_the_sites_accept(tmp_path, extreme):
    """The server's bounds and the sites' are one: a plan built from any server.yaml that loads (here its largest
    values and the defaults, and the examples in configs/) parses at the site, in its first and last exchange."""
    import yaml

    from server.app import round_plan
    from server.server_config import load_server_config

    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump({"classes": ["a", "b"], **extreme}))
    examples = sorted((Path(__file__).resolve().parents[1] / "configs").glob("server*.yaml"))
    assert examples
    for config in [load_server_config(path), *map(load_server_config, examples)]:
        for round_ in (1, config.federation.rounds + 1):
            plan = round_plan(config, "20260101-000000", round_)
            assert RoundPlan.from_config(plan.to_config()) == plan


def test_a_server_yaml_beyond_the_sites_bounds_is_refused_when_it_loads(tmp_path):
    from server.server_config import load_server_config

    path = tmp_path / "server.yaml"
    for text, said in (("federation: {rounds: 99000, spare_rounds: 1001}", "federation.spare_rounds: must be between"),
                       ("federation: {rounds: 99001}", "federation.rounds: must be between 1 and 99,000"),
                       ("strategy: {name: fedprox, proximal_mu: 2000000}", "strategy.proximal_mu: must be between"),
                       ("strategy: {name: fedprox, proximal_mu: .inf}", "strategy.proximal_mu: must be between")):
        path.write_text(f"classes: [a, b]\n{text}\n")
        with pytest.raises(ConfigError, match=said):
            load_server_config(path)
