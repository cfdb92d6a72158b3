"""What crossed the wire from the sites, for an auditor: one JSON line per reply the ServerApp
received (round, node, message type, an error reply's code and reason text verbatim, and for every
record: arrays as dtype and shape, numbers as their type, strings and booleans verbatim, bytes as
length and sha256). No array values are written.

On with ``federation.wire_log: true``; the tests read it to check that sites send nothing but
one vector of the model's values (or SecAgg+ protocol material) and numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from flwr.app import Message


def describe(message: Message) -> dict:
    entry = {"round": message.metadata.group_id, "node": message.metadata.src_node_id,
             "type": message.metadata.message_type, "error": message.has_error(), "arrays": {}, "values": {}}
    if message.has_error():
        entry.update(error_code=message.error.code, error_reason=message.error.reason)
        return entry
    if not message.has_content():
        return entry
    content = message.content
    for name, record in content.array_records.items():
        entry["arrays"][name] = {key: _array(array) for key, array in record.items()}
    for kind, records in (("metrics", content.metric_records), ("configs", content.config_records)):
        for name, record in records.items():
            entry["values"][f"{kind}:{name}"] = {key: _value(value) for key, value in record.items()}
    return entry


def _array(array) -> dict:
    """dtype and shape as the receiver decodes them (legacy replies carry serialised numpy bytes)."""
    decoded = array.numpy()
    return {"dtype": str(decoded.dtype), "shape": list(decoded.shape)}


def _value(value):
    if isinstance(value, list):
        return [_value(item) for item in value]
    if isinstance(value, bytes):
        return {"bytes": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, str):
        return {"str": value}
    if isinstance(value, bool):  # a site's SecAgg+ offer of its evaluation counts: what it told the server
        return value
    return type(value).__name__


class WireLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def record(self, messages: list[Message]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            for message in messages:
                handle.write(json.dumps(describe(message), sort_keys=True) + "\n")
