"""An append-only JSONL file in which every record is chained to the one before by its hash.

Both ends of a federation keep such a log: the server its audit log (``server/audit.py``: one
record per round) and every hospital its egress log (``client/egress_log.py``: one record per
message that left the site). The chain is what lets an auditor or a data-protection officer
trust the file afterwards: every record carries ``index`` (0-based), ``time`` (UTC),
``prev_hash`` (the hash of the record before it, 64 zeros for the first) and ``hash``, the
sha256 of the record's canonical JSON without its ``hash`` key. Editing, removing, reordering or
inserting a record breaks the chain at a line :meth:`HashChain.verify` names. Removing records
from the end leaves a valid chain, so the writer also keeps the latest hash somewhere else (the
server in the run's ``status.json``, a site in ``egress.head``) and passes it back as
``expected_last_hash``.

One process writes a log. Its first append (or read) reads and verifies the whole file, so an
append after a restart chains onto what is really on disk and never onto a history that was
tampered with in between. Later appends of the same :class:`HashChain` read only the last line
back, when the file is exactly as this object last saw it (device, inode, size, modification and
change times: any write since changes the change time, which a user cannot set back) and the
line still hashes to the record it saw there; otherwise they read and verify the whole file
again, which must still hold that record at its place (a log truncated or replaced while in use
is refused, not chained onto). A site's egress log gets a record per message for years, and
re-reading all of it made each append cost time in proportion to the log (about 20 ms at 1,000
records, seconds at 100,000: ``python -m benchmarks chain_append``). There is no secret in the
chain: someone who can rewrite the whole file and the place that keeps the last hash can forge a
history; copy the last hash elsewhere to prevent that.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shared.errors import UserError
from shared.file_memo import file_version
from shared.metrics import to_jsonable

GENESIS_HASH = "0" * 64
"""The ``prev_hash`` of the first record."""

CHAIN_FIELDS = ("index", "time", "prev_hash", "hash")
"""Fields the chain adds to every record; a caller's record must not set them."""


class ChainError(UserError):
    """The log is unreadable or its chain is broken, so its history cannot be trusted."""


def record_hash(record: dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of ``record`` without its ``hash`` key.

    Canonical = sorted keys, no spaces, UTF-8: the same content always gives the same bytes,
    whatever order the fields were written in.
    """
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def canonical_json(document: dict[str, Any]) -> str:
    """The one JSON text of ``document`` that is hashed and written (sorted keys, no NaN)."""
    try:
        return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"log record is not plain JSON data ({error}); pass numbers, strings, lists and dicts only."
        ) from error


@dataclass(frozen=True)
class _Tail:
    """Where this object last saw the file end: enough to chain on without reading it all again."""

    version: tuple[int, ...]  # device, inode, size, mtime and ctime: any write since changes one of them
    offset: int  # where the last record's line starts
    index: int
    hash: str


class HashChain:
    """A hash-chained JSONL file; a missing file is an empty log.

    Args:
        path: the JSONL file.
        label: what the log is called in error messages ("audit log", "egress log").
        error: the exception type raised for a broken or unreadable log (a ``ChainError``).
    """

    def __init__(self, path: Path, label: str = "log", error: type[ChainError] = ChainError) -> None:
        self.path = Path(path)
        self.label = label
        self.error = error
        self._tail: _Tail | None = None

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Chain ``record`` after the last one on disk, write it durably and return it in full.

        Numbers that are not finite (nan) are stored as null so the line stays valid JSON.
        Raises ``self.error`` if the log on disk is broken: nothing is appended to it.
        """
        clashing = sorted(set(record) & set(CHAIN_FIELDS))
        if clashing:
            raise ValueError(f"{self.label} records must not set {clashing}: the log adds {list(CHAIN_FIELDS)} "
                             "itself.")
        last = self.last_record()
        full: dict[str, Any] = {
            "index": last["index"] + 1 if last else 0,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **to_jsonable(record),
            "prev_hash": last["hash"] if last else GENESIS_HASH,
        }
        full["hash"] = record_hash(full)
        self._write_line(canonical_json(full), full["index"], full["hash"])
        return full

    def records(self) -> list[dict[str, Any]]:
        """Every record, after verifying the chain (``self.error`` if broken)."""
        return self._read_chain() if self.path.exists() else []

    def last_record(self) -> dict[str, Any] | None:
        """The last record (None while the log is empty): read back alone when the file is as this object
        last saw it, otherwise after reading and verifying the whole file, which must still hold the record
        this object last saw at its place (``self.error`` if not: the log was truncated or replaced)."""
        known = self._known_last_record()
        if known is not None:
            return known
        seen = self._tail
        records = self.records()
        if seen is not None and (len(records) <= seen.index or records[seen.index]["hash"] != seen.hash):
            raise self.error(f"{self.label} {self.path} no longer holds, at line {seen.index + 1}, the record this "
                             f"process wrote or read last (hash {seen.hash}): it was truncated or replaced while in "
                             "use, and nothing is chained onto it.")
        return records[-1] if records else None

    def last_hash(self) -> str | None:
        """The hash of the last record; None while the log is empty."""
        last = self.last_record()
        return last["hash"] if last else None

    def verify(self, expected_last_hash: str | None = None, expected_by: str = "the expected last hash",
               mismatch_hint: str = "it belongs to another log") -> list[dict[str, Any]]:
        """Check the whole chain and return its records.

        Args:
            expected_last_hash: the hash the last record must have (kept elsewhere by the
                writer); detects records removed from the end.
            expected_by: who expects that hash, for the message ("the latest checkpoint").
            mismatch_hint: the other explanation of a hash found nowhere in the log.

        Raises ``self.error`` naming the line and what is wrong, also for a missing file.
        """
        if not self.path.is_file():
            raise self.error(f"{self.label} {self.path} does not exist.")
        records = self._read_chain()
        if expected_last_hash is not None:
            self._check_last_hash(records, expected_last_hash, expected_by, mismatch_hint)
        return records

    def _known_last_record(self) -> dict[str, Any] | None:
        """The last record as this object saw it, if the file still ends with it; None to read it all."""
        tail = self._tail
        if tail is None:
            return None
        try:
            with open(self.path, "rb") as handle:
                if file_version(os.fstat(handle.fileno())) != tail.version:
                    return None
                handle.seek(tail.offset)
                record = json.loads(handle.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("hash") != tail.hash or record_hash(record) != tail.hash:
            return None
        return record

    def _write_line(self, line: str, written_index: int, written_hash: str) -> None:
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as handle:
            # A verified last line always ends in a newline unless someone removed it; never
            # glue a new record onto it.
            if handle.tell() and not _ends_with_newline(self.path):
                handle.write(b"\n")
            offset = handle.tell()
            handle.write((line + "\n").encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
            self._tail = _Tail(file_version(os.fstat(handle.fileno())), offset, written_index, written_hash)
        if created:  # the new directory entry must survive a power cut too
            directory = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def _read_chain(self) -> list[dict[str, Any]]:
        """Parse and verify every line; raise at the first one that breaks the chain."""
        try:
            with open(self.path, "rb") as handle:
                version = file_version(os.fstat(handle.fileno()))
                data = handle.read()
        except OSError as error:
            raise self.error(f"cannot read {self.label} {self.path}: {error}") from error
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()  # the newline that ends the last record
        records: list[dict[str, Any]] = []
        for number, raw in enumerate(lines, start=1):
            record = self._parse_line(number, raw, is_last=number == len(lines))
            self._check_link(number, record, records[-1] if records else None)
            records.append(record)
        if records:  # the whole file verified: later appends may chain on its last line alone (a read that
            # fails keeps what this object saw before, so that a log replaced meanwhile is still noticed)
            offset = len(data) - len(lines[-1]) - (1 if data.endswith(b"\n") else 0)
            if version[2] == len(data):  # not written to while read: the next append may trust this end
                self._tail = _Tail(version, offset, len(records) - 1, records[-1]["hash"])
        return records

    def _parse_line(self, number: int, raw: bytes, is_last: bool) -> dict[str, Any]:
        where = f"{self.label} {self.path}, line {number}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            hint = " (the last line is incomplete: was its writer killed while writing it?)" if is_last else ""
            raise self.error(f"{where} is not valid JSON{hint}: {error}") from error
        if not isinstance(record, dict):
            raise self.error(f"{where} is not a JSON object but {type(record).__name__}.")
        missing = [field for field in CHAIN_FIELDS if field not in record]
        if missing:
            raise self.error(f"{where} lacks the chain fields {missing}: it was not written by the {self.label}.")
        return record

    def _check_link(self, number: int, record: dict[str, Any], previous: dict[str, Any] | None) -> None:
        """Hash first (this record edited), then index (records removed or reordered), then the
        link to the previous record (an earlier record rewritten with a recomputed hash)."""
        where = f"{self.label} {self.path}, line {number}"
        actual = record_hash(record)
        if record["hash"] != actual:
            raise self.error(
                f"{where}: the record was edited after it was written (its content hashes to {actual}, "
                f"but it says {record['hash']})."
            )
        expected_index = previous["index"] + 1 if previous else 0
        if record["index"] != expected_index:
            raise self.error(
                f"{where}: index gap, expected record {expected_index} but found record {record['index']}: "
                "records were removed, reordered or inserted before this line."
            )
        expected_prev = previous["hash"] if previous else GENESIS_HASH
        if record["prev_hash"] != expected_prev:
            before = f"line {number - 1}" if previous else "the start of the log"
            raise self.error(
                f"{where}: prev_hash {record['prev_hash']} does not match {before} ({expected_prev}): "
                "a record before this one was removed, reordered or rewritten."
            )

    def _check_last_hash(self, records: list[dict[str, Any]], expected: str, expected_by: str,
                         mismatch_hint: str) -> None:
        if records and records[-1]["hash"] == expected:
            return
        found = next((number for number, record in enumerate(records, start=1) if record["hash"] == expected), None)
        if found is not None:
            raise self.error(
                f"{self.label} {self.path}: {expected_by} ends the log at line {found}, but "
                f"{len(records) - found} more record(s) follow it: they were written after {expected_by} was."
            )
        last = f"its last record (line {len(records)}) has hash {records[-1]['hash']}" if records else "it is empty"
        raise self.error(
            f"{self.label} {self.path} was truncated: {expected_by} expects a last record with hash {expected}, "
            f"but {last} and no record has that hash: records were removed from the end (or {mismatch_hint})."
        )


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"
