"""The site's egress policy, rule by rule, on replies built with Flower's public Message API."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from client.egress_policy import SECAGG_REPLY_KEYS, EgressPolicy, plan_weight, secagg_stage, value_kind
from tests.flower_messages import evaluate_reply, fit_reply, secagg_reply, server_message

STRICT = EgressPolicy(disclose=frozenset({"epsilon", "refused"}), require_secure_aggregation=True)
PLAIN = EgressPolicy(disclose=frozenset({"epsilon", "refused"}), require_secure_aggregation=False)

STAGE_VALUES = {
    Stage.SETUP: {Key.PUBLIC_KEY_1: b"k" * 32, Key.PUBLIC_KEY_2: b"q" * 32},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST: [6, 7], Key.CIPHERTEXT_LIST: [b"c" * 80, b"d" * 80]},
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS: [b"m" * 64, b"n" * 16]},
    Stage.UNMASK: {Key.NODE_ID_LIST: [5, 6, 7], Key.SHARE_LIST: [b"s" * 40] * 3},
}


def _found(policy: EgressPolicy, reply: Message, stage: str | None = None,
           weight: int | None = None) -> tuple[str, str] | None:
    violation = policy.check(reply, stage, weight)
    return None if violation is None else (violation.rule, violation.field)


def test_every_secure_aggregation_stage_reply_passes():
    for stage, values in STAGE_VALUES.items():
        message = server_message(stage=stage)
        base = fit_reply(message, {"epsilon": 1.5, "refused": 0}) if stage == Stage.COLLECT_MASKED_VECTORS else None
        assert _found(STRICT, secagg_reply(message, values, base), stage) is None, stage
    assert set(STAGE_VALUES) == set(SECAGG_REPLY_KEYS)  # the test covers every stage the table knows


def test_legacy_replies_with_disclosed_numbers_pass():
    message = server_message()
    assert _found(STRICT, fit_reply(message, {"epsilon": 2.0, "refused": 0})) is None
    assert _found(PLAIN, fit_reply(message, {"epsilon": float("nan"), "refused": 1}, arrays=True)) is None
    assert _found(STRICT, evaluate_reply(server_message(message_type="evaluate"), {"epsilon": 2.0})) is None


# (a) strings
def test_a_a_string_in_the_metrics_is_refused():
    found = _found(STRICT, fit_reply(server_message(), {"epsilon": 1.0, "slide": "S-2023-0042"}))
    assert found == ("a", "configs:fitres.metrics/slide")


def test_a_only_flowers_own_status_text_passes():
    assert _found(STRICT, fit_reply(server_message(), {"epsilon": 1.0}, status="Success")) is None
    found = _found(STRICT, fit_reply(server_message(), {"epsilon": 1.0}, status="patient 17 has no slides"))
    assert found == ("a", "configs:fitres.status/message")


def test_a_a_string_in_secure_aggregation_material_is_refused():
    message = server_message(stage=Stage.SETUP)
    reply = secagg_reply(message, {Key.PUBLIC_KEY_1: "not bytes", Key.PUBLIC_KEY_2: b"q" * 32})
    assert _found(STRICT, reply, Stage.SETUP) == ("a", "configs:secaggplus_configs/pk1")


# (b) metrics
def test_b_only_disclosed_keys_and_flowers_bookkeeping():
    message = server_message()
    assert _found(STRICT, fit_reply(message, {"epsilon": 1.0, "train_loss": 0.3})) == (
        "b", "configs:fitres.metrics/train_loss")
    extra = {"per_site": MetricRecord({"accuracy": 0.9})}
    assert _found(STRICT, fit_reply(message, {"epsilon": 1.0}, extra=extra)) == ("b", "metrics:per_site/accuracy")
    # num_examples is bookkeeping only in the record where Flower's protocol puts it
    extra = {"counts": MetricRecord({"num_examples": 3})}
    assert _found(STRICT, fit_reply(message, {"epsilon": 1.0}, extra=extra)) == ("b", "metrics:counts/num_examples")
    assert _found(STRICT, fit_reply(message, {"epsilon": 1.0}, extra={"mine": MetricRecord({"epsilon": 1.0})})) is None


def test_b_the_plaintext_weight_is_the_plans_constant_s():
    """A regression that put the site's patient count where Flower's protocol carries the plaintext weight would
    send it unmasked beside the masked vector: the weight must be the plan's S, the same for every site."""
    from shared.round_plan import RoundPlan

    plan = RoundPlan(federation_id="fed-1", classes=("a", "b"), weight_scale=50)
    message = server_message(RecordDict({"fitins.config": ConfigRecord(plan.to_config())}),
                             stage=Stage.COLLECT_MASKED_VECTORS)
    weight = plan_weight(message)
    assert weight == 50
    values = STAGE_VALUES[Stage.COLLECT_MASKED_VECTORS]
    sent = secagg_reply(message, values, fit_reply(message, {"epsilon": 1.0}, examples=50))
    assert _found(STRICT, sent, Stage.COLLECT_MASKED_VECTORS, weight) is None
    leaked = secagg_reply(message, values, fit_reply(message, {"epsilon": 1.0}, examples=12))  # 12 patients
    assert _found(STRICT, leaked, Stage.COLLECT_MASKED_VECTORS, weight) == ("b", "metrics:fitres.num_examples/"
                                                                            "num_examples")
    assert _found(PLAIN, fit_reply(server_message(), {"epsilon": 1.0}, examples=12, arrays=True), None, 50) == (
        "b", "metrics:fitres.num_examples/num_examples")  # plain rounds too
    # no readable plan: nothing to compare with (the ClientApp refuses such a message anyway)
    for content in (RecordDict(), RecordDict({"fitins.config": ConfigRecord({"fedpath-plan": "{"})}),
                    RecordDict({"fitins.config": ConfigRecord({"fedpath-plan": '{"weight_scale": true}'})})):
        assert plan_weight(server_message(content)) is None


def test_b_metrics_are_plain_numbers():
    message = server_message()
    assert _found(STRICT, fit_reply(message, {"epsilon": [0.9, 0.1]})) == ("b", "configs:fitres.metrics/epsilon")
    assert _found(STRICT, fit_reply(message, {"refused": True})) == ("b", "configs:fitres.metrics/refused")
    assert _found(STRICT, fit_reply(message, {"epsilon": b"\x00"})) == ("b", "configs:fitres.metrics/epsilon")
    extra = {"scores": MetricRecord({"epsilon": [0.2, 0.7, 0.9]})}  # per-slide scores never leave
    assert _found(STRICT, fit_reply(message, {"epsilon": 1.0}, extra=extra)) == ("b", "metrics:scores/epsilon")


def test_c_no_arrays_when_the_site_requires_secure_aggregation():
    message = server_message()
    assert _found(STRICT, fit_reply(message, {"epsilon": 1.0}, arrays=True)) == ("c", "arrays:fitres.parameters")
    assert _found(PLAIN, fit_reply(message, {"epsilon": 1.0}, arrays=True)) is None
    extra = {"other": ArrayRecord({"w": Array(np.zeros(4, np.float32))})}
    assert _found(STRICT, fit_reply(message, {"epsilon": 1.0}, extra=extra)) == ("c", "arrays:other")


# (d) config records
def test_d_unknown_config_records_are_refused():
    extra = {"site_info": ConfigRecord({"n": 3})}
    assert _found(STRICT, fit_reply(server_message(), {"epsilon": 1.0}, extra=extra)) == ("d", "configs:site_info")


def test_d_secure_aggregation_keys_of_another_stage_or_outside_the_protocol():
    message = server_message(stage=Stage.SETUP)
    reply = secagg_reply(message, {**STAGE_VALUES[Stage.SETUP], Key.SHARE_LIST: [b"s"]})
    assert _found(STRICT, reply, Stage.SETUP) == ("d", "configs:secaggplus_configs/shares")
    reply = secagg_reply(server_message(), STAGE_VALUES[Stage.SETUP])
    assert _found(STRICT, reply, None) == ("d", "configs:secaggplus_configs")  # not a SecAgg+ message
    reply = secagg_reply(message, {Key.PUBLIC_KEY_1: 5, Key.PUBLIC_KEY_2: b"q"})
    assert _found(STRICT, reply, Stage.SETUP) == ("d", "configs:secaggplus_configs/pk1")
    reply = secagg_reply(message, {Key.MASKED_PARAMETERS: [b"m"]})
    assert _found(STRICT, reply, Stage.UNMASK) == ("d", "configs:secaggplus_configs/masked_params")


def test_d_status_record_holds_only_code_and_text():
    extra = {"fitres.status": ConfigRecord({"code": 0, "message": "Success", "detail": 3})}
    assert _found(STRICT, fit_reply(server_message(), {"epsilon": 1.0}, extra=extra)) == (
        "d", "configs:fitres.status/detail")


# (e) errors
def test_e_errors_leave_as_a_code_only():
    message = server_message()
    assert _found(STRICT, Message(Error(code=1013), reply_to=message)) is None
    assert _found(STRICT, Message(Error(code=1013, reason=""), reply_to=message)) is None
    found = _found(STRICT, Message(Error(code=0, reason="<class 'KeyError'>:<'patient-17'>"), reply_to=message))
    assert found == ("e", "error.reason")


def test_stage_is_read_from_the_incoming_message():
    assert secagg_stage(server_message(stage=Stage.UNMASK)) == Stage.UNMASK
    assert secagg_stage(server_message()) is None
    assert secagg_stage(server_message(RecordDict({"fitins.config": ConfigRecord({"x": 1})}))) is None


@pytest.mark.parametrize("value, kind", [(1, "int"), (1.0, "float"), (True, "bool"), ("s", "str"), (b"b", "bytes"),
                                         ([1, 2], "list[int]"), ([b"a"], "list[bytes]"), ([], "list[]"),
                                         ([1, "a"], "list[mixed]")])
def test_value_kinds(value, kind):
    assert value_kind(value) == kind
