"""The run's audit log: one JSON line per event, each chained to the one before by its hash.

A consortium has to be able to show afterwards which sites took part in which round, which
global model came out of it and how much privacy each site spent. The log is append-only
JSONL; every record carries ``index`` (0-based), ``time`` (UTC), ``prev_hash`` (the hash of
the record before it, 64 zeros for the first) and ``hash``, the sha256 of the record's
canonical JSON without its ``hash`` key. Editing, removing, reordering or inserting a
record breaks the chain at a line :func:`verify` names. Removing records from the end leaves
a valid chain, so the server also stores the latest hash in the run's ``status.json`` and
passes it back as ``expected_last_hash``.

One server process writes the log. Every append re-reads and re-verifies the whole file (a
few hundred short lines: milliseconds), so an append after a restart chains onto what is
really on disk and never onto a history that was tampered with in between.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shared.errors import UserError
from shared.metrics import to_jsonable

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of the first record."""

CHAIN_FIELDS = ("index", "time", "prev_hash", "hash")
"""Fields the log adds to every record; a caller's record must not set them."""


class AuditError(UserError):
    """The audit log is unreadable or its chain is broken, so the run's history cannot be trusted."""


def record_hash(record: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``record`` without its ``hash`` key.

    Canonical = sorted keys, no spaces, UTF-8: the same content always gives the same bytes,
    whatever order the fields were written in.
    """
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()


def verify(path: Path, expected_last_hash: str | None = None) -> int:
    """Check the whole chain of the log at ``path`` and return its number of records.

    ``expected_last_hash`` is the hash the run's status.json recorded; when given,
    the last record must have it, which detects records removed from the end.
    Raises :class:`AuditError` naming the line and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"audit log {path} does not exist.")
    records = _read_chain(path)
    if expected_last_hash is not None:
        _check_last_hash(path, records, expected_last_hash)
    return len(records)


class AuditLog:
    """Appends hash-chained records to a JSONL file; a missing file is an empty log."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Chain ``record`` after the last one on disk, write it durably and return it in full.

        Numbers that are not finite (nan) are stored as null so the line stays valid JSON.
        Raises :class:`AuditError` if the log on disk is broken: nothing is appended to it.
        """
        clashing = sorted(set(record) & set(CHAIN_FIELDS))
        if clashing:
            raise ValueError(f"audit records must not set {clashing}: the log adds {list(CHAIN_FIELDS)} itself.")
        existing = self.records()
        full: dict[str, Any] = {
            "index": len(existing),
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **to_jsonable(record),
            "prev_hash": existing[-1]["hash"] if existing else GENESIS_HASH,
        }
        full["hash"] = record_hash(full)
        self._write_line(_canonical(full))
        return full

    def records(self) -> list[dict[str, Any]]:
        """Every record, after verifying the chain (AuditError if broken)."""
        return _read_chain(self.path) if self.path.exists() else []

    def last_hash(self) -> str | None:
        """The hash of the last record, for the next checkpoint's model card; None while empty."""
        records = self.records()
        return records[-1]["hash"] if records else None

    def _write_line(self, line: str) -> None:
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as handle:
            # A verified last line always ends in a newline unless someone removed it; never
            # glue a new record onto it.
            if handle.tell() and not _ends_with_newline(self.path):
                handle.write(b"\n")
            handle.write((line + "\n").encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        if created:  # the new directory entry must survive a power cut too
            directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)


def _canonical(document: dict[str, Any]) -> str:
    try:
        return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"audit record is not plain JSON data ({error}); pass numbers, strings, lists and dicts only."
        ) from error


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _read_chain(path: Path) -> list[dict[str, Any]]:
    """Parse and verify every line; raise AuditError at the first one that breaks the chain."""
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as error:
        raise AuditError(f"cannot read audit log {path}: {error}") from error
    if lines[-1] == b"":
        lines.pop()  # the newline that ends the last record
    records: list[dict[str, Any]] = []
    for number, raw in enumerate(lines, start=1):
        record = _parse_line(path, number, raw, is_last=number == len(lines))
        _check_link(path, number, record, records[-1] if records else None)
        records.append(record)
    return records


def _parse_line(path: Path, number: int, raw: bytes, is_last: bool) -> dict[str, Any]:
    where = f"audit log {path}, line {number}"
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        hint = " (the last line is incomplete: was the server killed while writing it?)" if is_last else ""
        raise AuditError(f"{where} is not valid JSON{hint}: {error}") from error
    if not isinstance(record, dict):
        raise AuditError(f"{where} is not a JSON object but {type(record).__name__}.")
    missing = [field for field in CHAIN_FIELDS if field not in record]
    if missing:
        raise AuditError(f"{where} lacks the chain fields {missing}: it was not written by the audit log.")
    return record


def _check_link(path: Path, number: int, record: dict[str, Any], previous: dict[str, Any] | None) -> None:
    """Hash first (this record edited), then index (records removed or reordered), then the
    link to the previous record (an earlier record rewritten with a recomputed hash)."""
    where = f"audit log {path}, line {number}"
    actual = record_hash(record)
    if record["hash"] != actual:
        raise AuditError(
            f"{where}: the record was edited after it was written (its content hashes to {actual}, "
            f"but it says {record['hash']})."
        )
    expected_index = previous["index"] + 1 if previous else 0
    if record["index"] != expected_index:
        raise AuditError(
            f"{where}: index gap, expected record {expected_index} but found record {record['index']}: "
            "records were removed, reordered or inserted before this line."
        )
    expected_prev = previous["hash"] if previous else GENESIS_HASH
    if record["prev_hash"] != expected_prev:
        before = f"line {number - 1}" if previous else "the start of the log"
        raise AuditError(
            f"{where}: prev_hash {record['prev_hash']} does not match {before} ({expected_prev}): "
            "a record before this one was removed, reordered or rewritten."
        )


def _check_last_hash(path: Path, records: list[dict[str, Any]], expected: str) -> None:
    if records and records[-1]["hash"] == expected:
        return
    found = next((number for number, record in enumerate(records, start=1) if record["hash"] == expected), None)
    if found is not None:
        raise AuditError(
            f"audit log {path}: the latest checkpoint ends the log at line {found}, but "
            f"{len(records) - found} more record(s) follow it: they were written after that checkpoint."
        )
    last = f"its last record (line {len(records)}) has hash {records[-1]['hash']}" if records else "it is empty"
    raise AuditError(
        f"audit log {path} was truncated: the latest checkpoint expects a last record with hash {expected}, "
        f"but {last} and no record has that hash: records were removed from the end "
        "(or the checkpoint belongs to another run)."
    )
