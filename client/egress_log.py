"""The hospital's own record of everything that left it: ``state_dir/egress.jsonl``.

The server keeps an audit log and, on request, a wire log; both are written by the consortium.
A hospital's data-protection officer needs a record the hospital writes itself. The task runner
(``client/task_runner.py``) appends one record per message it hands to the SuperNode (replies,
refusals, errors), before handing it over, plus one ``start`` record each time it starts (which
fedpath version, which bundles are allowed, which numbers the site discloses).

A reply's record holds its time, Flower run id, round (Flower's group id), message type and
SecAgg+ stage (each as the server chose it when short and plain, otherwise by length and hash:
``shared/server_labels.py``), what happened (``sent``, ``refused``, ``error``, ``withheld``), the content digest
of the app bundle of the run, and the reply's structure: every record and key; arrays as dtype,
shape and byte size; numbers in metric records (and in Flower's legacy metrics records) as their
values, since these are the values the site discloses; bytes as their length and sha256 (never
the masked contents); lists as length and element type; booleans (a SecAgg+ setup's offer of
evaluation counts) as their values; an error reply's code. Nothing else of the reply is written. A
reply to a message for which the federation's privacy ledger recorded a release (a training round or
an evaluation release) also names that federation (``spent``; also when the reply is a refusal after
training, e.g. code 6), and the first ``start`` record of a log holds each ledger's release count then
(``ledger_releases``): the task runner compares them with the ledgers (``client/ledger_guard.py``).

The file is hash-chained (``shared/hash_chain.py``): ``fedpath-site egress verify`` finds an edited,
removed, inserted or reordered record by its line, and truncation by comparing with
``egress.head`` (the last record's hash and the record count, rewritten atomically after every
append). Someone who can rewrite both files can forge a history: a DPO who notes the last hash
``egress verify`` prints (or copies ``egress.head`` elsewhere) and later passes it as
``--expect-last-hash`` detects that too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from flwr.app import Message

from client.egress_policy import ALLOWED_STATUS_TEXTS, LEGACY_METRIC_CARRIERS, LEGACY_STATUS_RECORDS, value_kind
from shared.atomic_files import atomic_write_json
from shared.hash_chain import GENESIS_HASH, ChainError, HashChain
from shared.refusals import refusal_code, refusal_text
from shared.server_labels import server_label

log = logging.getLogger("fedpath.egress")

EGRESS_FILE = "egress.jsonl"
HEAD_FILE = "egress.head"
LABEL = "egress log"

SENT, REFUSED, ERROR, WITHHELD = "sent", "refused", "error", "withheld"
OUTCOMES = {
    SENT: "the ClientApp's reply, checked by the egress policy",
    REFUSED: "refused before the ClientApp ran: the run's app bundle is not allowed here, or the federation's "
             "privacy ledger is behind this log (code 18, client/ledger_guard.py)",
    ERROR: "an error while handling the message (details only in the site's log)",
    WITHHELD: "the ClientApp's reply failed the egress policy and was replaced by an error",
}


class EgressError(ChainError):
    """The egress log is unreadable, or its chain or head file is broken."""


def describe_reply(message: Message, reply: Message, stage: str | None, outcome: str, bundle: str | None,
                   violation: Any = None) -> dict[str, Any]:
    """The egress record of ``reply``, the answer to ``message`` (see the module docstring).

    Args:
        message: the message from the server it answers (run, round, type).
        reply: what leaves.
        stage: the SecAgg+ stage of ``message`` (None outside SecAgg+).
        outcome: SENT, REFUSED, ERROR or WITHHELD.
        bundle: content digest of the run's app bundle (None if it could not be read).
        violation: for WITHHELD, the egress policy's finding (rule and field; never a value).
    """
    metadata = message.metadata
    record: dict[str, Any] = {
        "event": "reply", "run": metadata.run_id, "round": server_label(metadata.group_id),
        "node": metadata.dst_node_id, "type": server_label(metadata.message_type), "stage": server_label(stage),
        "outcome": outcome, "bundle": bundle,
    }
    if reply.has_error():
        record["error_code"] = reply.error.code
    else:
        record["content"] = describe_content(reply)
    if violation is not None:
        record["violation"] = {"rule": violation.rule, "field": violation.field}
    return record


def describe_content(reply: Message) -> dict[str, dict[str, Any]]:
    """The structure of a reply's content: arrays, metric values, config structure."""
    content = reply.content
    return {
        "arrays": {name: {key: _array(array) for key, array in record.items()}
                   for name, record in content.array_records.items()},
        "metrics": {name: {key: _number(value) for key, value in record.items()}
                    for name, record in content.metric_records.items()},
        "configs": {name: {key: (_number(value) if name in LEGACY_METRIC_CARRIERS else
                                 _status_value(value) if name in LEGACY_STATUS_RECORDS else _shape(value))
                           for key, value in record.items()}
                    for name, record in content.config_records.items()},
    }


def _array(array: Any) -> dict[str, Any]:
    dtype, shape = array.dtype, list(array.shape)
    if not dtype:  # Flower's legacy arrays are serialised numpy without metadata: read our own reply's header
        decoded = array.numpy()
        dtype, shape = str(decoded.dtype), list(decoded.shape)
    return {"dtype": dtype, "shape": shape, "bytes": len(array.data)}


def _number(value: Any) -> Any:
    """A disclosed number as its value (nan/inf as text: JSON has no such numbers); anything
    else (the egress policy lets none through) by its structure only."""
    if value_kind(value) == "float":
        return value if math.isfinite(value) else str(value)
    if value_kind(value) == "int":
        return value
    return _shape(value)


def _status_value(value: Any) -> Any:
    return value if value_kind(value) == "int" or value in ALLOWED_STATUS_TEXTS else _shape(value)


def _shape(value: Any) -> Any:
    kind = value_kind(value)
    if kind == "bool":  # a yes/no the site states in plain form (its SecAgg+ offer of evaluation counts)
        return value
    if kind == "bytes":
        return {"bytes": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    if kind.startswith("list["):
        shape: dict[str, Any] = {"list": len(value), "of": kind[5:-1]}
        if kind == "list[bytes]":
            shape["bytes"] = sum(len(item) for item in value)
        return shape
    if kind == "str":
        return {"str": len(value)}
    return {"type": kind}


class EgressLog:
    """``state_dir/egress.jsonl`` and its head file.

    Args:
        state_dir: the site's state folder (site.yaml ``state_dir``).
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / EGRESS_FILE
        self.head_path = Path(state_dir) / HEAD_FILE
        self.chain = HashChain(self.path, label=LABEL, error=EgressError)

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Chain ``record``, write it durably, then move the head file to it. Raises EgressError
        (nothing written) if the log on disk is broken."""
        full = self.chain.append(record)
        atomic_write_json(self.head_path, {"records": full["index"] + 1, "last_hash": full["hash"],
                                           "time": full["time"]})
        return full

    def open_for_writing(self) -> list[dict[str, Any]]:
        """Before the runner appends: the chain must verify and end where the head file says.

        A head one step behind the log is what a power cut between the two writes leaves: it
        is moved forward with a warning. Returns the records (the runner's ledger guard counts
        them: one full read at start). Raises EgressError for anything else, so the runner never
        chains onto a history that was tampered with.
        """
        records = self.chain.records()
        head = self._head()
        if head is None:
            if records:
                raise EgressError(f"{self.head_path} is missing but {self.path} holds {len(records)} records: records "
                                  "may have been removed from its end. " + _KEEP_ADVICE)
            # a head before the first record: a stop between that record and its head is then "one behind"
            # like any other, not a missing head that only the DPO can clear
            atomic_write_json(self.head_path, {"records": 0, "last_hash": GENESIS_HASH, "time": None})
            return records
        hashes = [GENESIS_HASH] + [r["hash"] for r in records]
        if head["last_hash"] == hashes[-1]:
            return records
        if records and head["last_hash"] == hashes[-2]:
            log.warning("%s: its head file was one record behind (a stop between the two writes); moved forward",
                        self.path)
            atomic_write_json(self.head_path, {"records": len(records), "last_hash": hashes[-1],
                                               "time": records[-1]["time"]})
            return records
        self.verify()  # raises with the precise reason
        raise EgressError(f"{self.path} does not end where {self.head_path} says. " + _KEEP_ADVICE)

    def verify(self, expected_last_hash: str | None = None) -> list[dict[str, Any]]:
        """Check the chain, that it ends at the head file's hash (truncation), and at
        ``expected_last_hash`` when given (a hash the DPO noted earlier); return the records.
        Raises EgressError naming the first broken line."""
        if not self.path.exists() and not self.head_path.exists():
            raise EgressError(f"{self.path} does not exist: the site's task runner writes it when it first starts "
                              "(`fedpath-site start`); if it ran here before, the log was moved or deleted")
        for attempt in range(2):  # the runner may append between reading the log and its head
            try:
                head = self._head()
                if head is not None and head["last_hash"] == GENESIS_HASH and not self.path.exists():
                    records = []  # a runner started, nothing answered yet
                    break
                records = self.chain.verify(head["last_hash"] if head else None,
                                            expected_by=f"the head file {self.head_path}",
                                            mismatch_hint="the head file belongs to another site")
                if head is None and records:
                    raise EgressError(f"{self.head_path} is missing but {self.path} holds {len(records)} records: "
                                      "records may have been removed from its end.")
                break
            except EgressError:
                if attempt:
                    raise
                time.sleep(0.5)
        if expected_last_hash is not None and expected_last_hash not in {r["hash"] for r in records}:
            raise EgressError(f"{self.path}: no record has the hash {expected_last_hash} noted earlier: the log was "
                              "rewritten or truncated since (or the hash belongs to another site).")
        return records

    def _head(self) -> dict[str, Any] | None:
        try:
            head = json.loads(self.head_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise EgressError(f"{self.head_path} is unreadable ({error}). " + _KEEP_ADVICE) from None
        if not isinstance(head, dict) or not isinstance(head.get("last_hash"), str):
            raise EgressError(f"{self.head_path} is not an egress head file. " + _KEEP_ADVICE)
        return head


_KEEP_ADVICE = ("Keep both files for the data-protection officer, move them out of the state folder, and start the "
                "site again: a new log begins.")


def render(records: list[dict[str, Any]]) -> str:
    """Readable lines, one per record, for `fedpath-site egress show`."""
    return "\n".join(_render(record) for record in records)


def _render(record: dict[str, Any]) -> str:
    head = f"#{record['index']} {record['time']}"
    event = record.get("event")
    if event == "start":
        bundles = ", ".join(d[:12] for d in record.get("allowed_bundles", [])) or "none"
        baseline = record.get("ledger_releases")
        return (f"{head} runner started: fedpath {record.get('version')} bundle {str(record.get('app_digest'))[:12]}, "
                f"also allowed: {bundles}; discloses {record.get('disclose')}; "
                f"secure aggregation {'required' if record.get('require_secure_aggregation') else 'optional'}"
                + (f"; ledgers then: {baseline or 'none'}" if isinstance(baseline, dict) else ""))
    if event == "push-failed":
        return f"{head} the reply of record #{record.get('record')} could not be handed to the SuperNode"
    if event != "reply":
        return f"{head} {event}"
    what = record["type"] + (f"/{record['stage']}" if record.get("stage") else "")
    line = f"{head} run {record['run']} round {record['round'] or '-'} {what}: {record['outcome']}"
    if "error_code" in record:
        code = record["error_code"]
        meaning = "Flower error" if refusal_code(code) is None else refusal_text(refusal_code(code))
        line += f" code {code} ({meaning})"
    if record.get("violation"):
        line += f" [policy rule ({record['violation']['rule']}) at {record['violation']['field']}]"
    if record.get("spent"):
        line += f" [its ledger recorded a release in federation {record['spent']}]"
    if record.get("content"):
        line += " " + _render_content(record["content"])
    return line


def _render_content(content: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, arrays in content.get("arrays", {}).items():
        inner = ", ".join(f"{k} {a['dtype']}{a['shape']} {a['bytes']} B" for k, a in arrays.items())
        parts.append(f"arrays {name}{{{inner}}}")
    for kind in ("metrics", "configs"):
        for name, values in content.get(kind, {}).items():
            parts.append(f"{name}{{{', '.join(f'{k}={_render_value(v)}' for k, v in values.items())}}}")
    return "; ".join(parts)


def _render_value(value: Any) -> str:
    if isinstance(value, dict):
        if "list" in value:
            total = f", {value['bytes']} B" if "bytes" in value else ""
            return f"[{value['list']} x {value['of'] or '-'}{total}]"
        if "bytes" in value:
            return f"<{value['bytes']} B>"
        if "str" in value:
            return f"<text, {value['str']} chars>"
        return f"<{value.get('type')}>"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
