"""What a reply may hold before it leaves the hospital: the site's egress policy.

The ClientApp decides what it sends (``client/app.py``, ``client/federated_round.py``); the task
runner checks every reply against this policy before it leaves, as defense in depth: a bug or a
change in the ClientApp that starts sending a label, a path, a per-slide score or the plain
update under secure aggregation is stopped here, answered with ``Error(REFUSAL_ERROR_BASE + 14)``
(no text), and the site's log says which field failed.

The rules (each a small table below, so they are easy to read and to adjust):

(a) no string anywhere, except Flower's own fixed legacy status text (``ALLOWED_STATUS_TEXTS``);
(b) metric values are plain numbers (int or float, no lists, no booleans), under keys from the
    site's ``disclose:`` list plus Flower's legacy bookkeeping keys the protocol needs
    (``BOOKKEEPING_METRICS``); Flower's legacy ClientApp puts the metrics dict into a *config*
    record (``LEGACY_METRIC_CARRIERS``), which is held to the same rule; a training reply's plaintext
    weight (``num_examples``) is the plan's constant S, the same for every site (``plan_weight``): a
    patient count there would leave unmasked;
(c) array records are empty when the site requires secure aggregation (under SecAgg+ Flower's
    mod clears them and sends the masked vector as bytes in a config record);
(d) config records only as the SecAgg+ protocol produces them in the stage being answered
    (``SECAGG_REPLY_KEYS``: known keys, bytes, ints and lists of them), the site's signed
    statements of that stage and, at setup, its yes/no offer of evaluation counts
    (``SIGNED_REPLY_KEYS``, ``shared/signed_secagg.py``), plus Flower's
    legacy status record (``LEGACY_STATUS_RECORDS``) and the legacy metric carriers of (b);
(e) an error reply carries a code and no reason text.

Anything the tables do not name is refused: a new record or key needs a line here, reviewed
like any other change to what leaves a hospital.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.secure_round import is_survivors_request
from shared import signed_secagg
from shared.refusals import federation_id_problem
from shared.round_plan import PLAN_KEY

# --- (a) strings -----------------------------------------------------------------------------
ALLOWED_STATUS_TEXTS = frozenset({"Success"})
"""The only string a reply may carry: the status text of Flower's legacy NumPyClient replies
(``flwr/compat/client/numpy_client.py``: ``Status(code=Code.OK, message="Success")``)."""

# --- (b) metrics ------------------------------------------------------------------------------
BOOKKEEPING_METRICS: dict[str, frozenset[str]] = {
    # flwr/compat/common/recorddict_compat.py fitres_to_recorddict / evaluateres_to_recorddict:
    # the weight of a site's update in FedAvg, and the legacy evaluate reply's loss and count.
    # Each is a metric record that holds exactly this key.
    "fitres.num_examples": frozenset({"num_examples"}),
    "evaluateres.num_examples": frozenset({"num_examples"}),
    "evaluateres.loss": frozenset({"loss"}),
}
"""Metric record name -> keys Flower's legacy protocol needs there besides the disclosed ones."""

TRAINING_WEIGHT = "fitres.num_examples"
"""Where a training reply carries its plaintext weight: the plan's S (``RoundPlan.weight_scale``)."""

LEGACY_METRIC_CARRIERS = frozenset({"fitres.metrics", "evaluateres.metrics"})
"""Config records in which Flower's legacy replies carry the ClientApp's metrics dict (a config
record because legacy metrics may be strings; fedpath's may not): rule (b) applies to them."""


# --- (d) config records ---------------------------------------------------------------------
LEGACY_STATUS_RECORDS = frozenset({"fitres.status", "evaluateres.status"})
LEGACY_STATUS_KEYS = {"code": "int", "message": "str"}
"""flwr/compat/common/recorddict_compat.py _embed_status_into_recorddict: code and status text."""

SECAGG_REPLY_KEYS: dict[str, dict[str, str]] = {
    # flwr/client/mod/secure_aggregation/secaggplus_mod.py: what each stage returns.
    Stage.SETUP: {Key.PUBLIC_KEY_1: "bytes", Key.PUBLIC_KEY_2: "bytes"},
    Stage.SHARE_KEYS: {Key.DESTINATION_LIST: "list[int]", Key.CIPHERTEXT_LIST: "list[bytes]"},
    Stage.COLLECT_MASKED_VECTORS: {Key.MASKED_PARAMETERS: "list[bytes]"},
    Stage.UNMASK: {Key.NODE_ID_LIST: "list[int]", Key.SHARE_LIST: "list[bytes]"},
}
"""SecAgg+ stage -> key -> kind of value the site's reply to that stage may hold in the
``secaggplus_configs`` record."""

SECAGG_RECORD = RECORD_KEY_CONFIGS

SIGNED_REPLY_KEYS: dict[str, dict[str, str]] = {
    # shared/signed_secagg.py: the site's signature of its keys and the public key it signs with, of
    # the round's list of sites, of the survivors (fedpath's own stage; no signature without a roster);
    # at setup also whether the site offers its evaluation counts this round (with or without a roster).
    Stage.SETUP: {signed_secagg.KEY_SIGNATURE: "bytes", signed_secagg.SIGNER: "bytes",
                  signed_secagg.EVALUATION_OFFER: "bool"},
    Stage.SHARE_KEYS: {signed_secagg.VIEW_SIGNATURE: "bytes"},
    Stage.COLLECT_MASKED_VECTORS: {},
    Stage.UNMASK: {},
    signed_secagg.SURVIVORS_STAGE: {signed_secagg.SURVIVORS_SIGNATURE: "bytes"},
}
"""Stage -> key -> kind of value the site's reply may hold in its ``fedpath-secagg`` record."""


@dataclass(frozen=True)
class Violation:
    """The first thing in a reply that breaks the policy (never the value itself: it may be private)."""

    rule: str  # "a".."e", as in the module docstring; "ledger" from the task runner's ledger guard
    field: str  # where: "configs:fitres.metrics/train_loss"
    problem: str  # what is wrong, in words

    def __str__(self) -> str:
        return f"rule ({self.rule}) at {self.field}: {self.problem}"


@dataclass(frozen=True)
class EgressPolicy:
    """The site's policy; :meth:`check` a reply before it leaves.

    Args:
        disclose: metric keys the site agreed to send in plain form (site.yaml ``disclose:``).
        require_secure_aggregation: site.yaml ``federation.require_secure_aggregation``.
    """

    disclose: frozenset[str] = field(default_factory=frozenset)
    require_secure_aggregation: bool = True

    @classmethod
    def for_site(cls, config: Any) -> "EgressPolicy":
        """The policy of a ``SiteConfig``."""
        return cls(frozenset(config.disclose), config.federation.require_secure_aggregation)

    def check(self, reply: Message, stage: str | None, weight: int | None = None) -> Violation | None:
        """The first violation in ``reply``, or None if it may leave.

        Args:
            reply: the message about to leave.
            stage: the SecAgg+ stage of the message it answers (None outside SecAgg+): only
                that stage's keys may appear in the SecAgg+ record.
            weight: the plaintext weight S of the plan the message carried (``plan_weight``; None: no
                plan, nothing to compare with).
        """
        if reply.has_error():
            return self._check_error(reply)
        if not reply.has_content():
            return Violation("e", "message", "a reply with neither content nor an error")
        content = reply.content
        for name, record in content.array_records.items():
            if self.require_secure_aggregation and len(record):
                return Violation("c", f"arrays:{name}", f"{len(record)} array(s) in a reply of a site that requires "
                                 "secure aggregation (the update may leave only masked)")
        for name, record in content.metric_records.items():
            if problem := self._check_metrics(f"metrics:{name}", record, BOOKKEEPING_METRICS.get(name, frozenset())):
                return problem
            if name == TRAINING_WEIGHT and weight is not None and record.get("num_examples") != weight:
                return Violation("b", f"metrics:{name}/num_examples", "a plaintext weight other than the plan's "
                                 "constant S: a site's patient count leaves only inside the masked vector")
        for name, record in content.config_records.items():
            where = f"configs:{name}"
            if name in LEGACY_METRIC_CARRIERS:
                problem = self._check_metrics(where, record, frozenset())
            elif name in LEGACY_STATUS_RECORDS:
                problem = _check_status(where, record)
            elif name == SECAGG_RECORD:
                problem = _check_secagg(where, record, stage, SECAGG_REPLY_KEYS)
            elif name == signed_secagg.RECORD:
                problem = _check_secagg(where, record, stage, SIGNED_REPLY_KEYS)
            else:
                problem = Violation("d", where, "config record not allowed (only SecAgg+ material, Flower's legacy "
                                    "status and metrics records)")
            if problem:
                return problem
        return None

    def allowed_metric(self, key: str, bookkeeping: frozenset[str]) -> bool:
        return key in self.disclose or key in bookkeeping

    def _check_metrics(self, where: str, record: Any, bookkeeping: frozenset[str]) -> Violation | None:
        for key, value in record.items():
            kind = value_kind(value)
            if kind == "str":
                return Violation("a", f"{where}/{key}", "a string (only Flower's status text may leave)")
            if kind not in ("int", "float"):
                return Violation("b", f"{where}/{key}", f"a {kind}: metrics must be plain numbers")
            if not self.allowed_metric(key, bookkeeping):
                allowed = sorted(self.disclose | bookkeeping)
                return Violation("b", f"{where}/{key}", f"key not disclosed by this site (disclose: {allowed})")
        return None

    @staticmethod
    def _check_error(reply: Message) -> Violation | None:
        if reply.error.reason:
            return Violation("e", "error.reason", f"an error reply with reason text ({len(reply.error.reason)} "
                             "characters): errors leave as a code only")
        if value_kind(reply.error.code) != "int":
            return Violation("e", "error.code", "an error code that is not an integer")
        return None


def _check_status(where: str, record: Any) -> Violation | None:
    for key, value in record.items():
        kind = value_kind(value)
        if LEGACY_STATUS_KEYS.get(key) != kind:
            rule = "a" if kind == "str" else "d"
            return Violation(rule, f"{where}/{key}", f"a {kind} where Flower's status record holds only "
                             f"{LEGACY_STATUS_KEYS}")
        if kind == "str" and value not in ALLOWED_STATUS_TEXTS:
            return Violation("a", f"{where}/{key}", f"status text other than Flower's fixed "
                             f"{sorted(ALLOWED_STATUS_TEXTS)} ({len(value)} characters)")
    return None


def _check_secagg(where: str, record: Any, stage: str | None, table: dict[str, dict[str, str]]) -> Violation | None:
    allowed = table.get(stage or "")
    if allowed is None:
        return Violation("d", where, "SecAgg+ material in a reply to a message that was not a SecAgg+ stage"
                         if stage is None else f"unknown SecAgg+ stage {stage!r}")
    for key, value in record.items():
        kind = value_kind(value)
        if key not in allowed:
            return Violation("d", f"{where}/{key}", f"key not produced by SecAgg+ stage {stage!r} "
                             f"(allowed: {sorted(allowed)})")
        if kind != allowed[key] and not (kind == "list[]" and allowed[key].startswith("list[")):
            return Violation("a" if "str" in kind else "d", f"{where}/{key}",
                             f"a {kind} where SecAgg+ stage {stage!r} sends {allowed[key]}")
    return None


def value_kind(value: Any) -> str:
    """"int", "float", "bool", "str", "bytes", "list[<kind>]" (a mixed list: "list[mixed]", an
    empty one "list[]"), or the type's name: the vocabulary of the tables above."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes):
        return "bytes"
    if isinstance(value, list):
        kinds = {value_kind(item) for item in value}
        return f"list[{kinds.pop() if len(kinds) == 1 else 'mixed' if kinds else ''}]"
    return type(value).__name__


def plan_document(message: Message) -> dict[str, Any] | None:
    """The round plan an incoming training message carries (Flower's legacy ``fitins.config`` record),
    as the server wrote it and not yet checked, or None without a readable one."""
    if message.has_error() or not message.has_content():
        return None
    config = message.content.config_records.get("fitins.config")
    try:
        document = json.loads(str(config[PLAN_KEY])) if config is not None else None
    except (KeyError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def plan_weight(message: Message) -> int | None:
    """The plaintext weight S of the round plan an incoming training message carries, or None without a
    readable one. Read before the ClientApp runs."""
    weight = (plan_document(message) or {}).get("weight_scale")
    return weight if isinstance(weight, int) and not isinstance(weight, bool) else None


def plan_federation(message: Message) -> str | None:
    """The federation id of the round plan an incoming message carries, or None without a valid one
    (the ClientApp then refuses, code 10). Read before the ClientApp runs."""
    federation = (plan_document(message) or {}).get("federation_id")
    return federation if federation_id_problem(federation) is None else None


def secagg_stage(message: Message) -> str | None:
    """The SecAgg+ stage an incoming message asks for, or fedpath's survivors stage (None outside
    SecAgg+). Read it before the ClientApp runs: Flower's mod pops it from the message."""
    if message.has_error() or not message.has_content():
        return None
    configs = message.content.config_records.get(SECAGG_RECORD)
    stage = configs.get(Key.STAGE) if configs is not None else None
    if stage is None and is_survivors_request(message):
        stage = signed_secagg.SURVIVORS_STAGE
    return stage if isinstance(stage, str) else None

