"""The run's audit log: one JSON line per event, each chained to the one before by its hash.

A consortium has to be able to show afterwards which sites took part in which round, which
global model came out of it and how much privacy each site spent. The log is append-only
JSONL chained by sha256 (``shared/hash_chain.py``, the same chain a site's egress log uses):
editing, removing, reordering or inserting a record breaks the chain at a line :func:`verify`
names. Removing records from the end leaves a valid chain, so the server also stores the latest
hash in the run's ``status.json`` and passes it back as ``expected_last_hash``.

One server process writes the log. Its first append verifies the whole file, so an append after
a restart chains onto what is really on disk and never onto a history that was tampered with in
between; later appends of the same process read back only the last line while the file is as it left it
(``shared/hash_chain.py``).
"""

from __future__ import annotations

from pathlib import Path

from shared.hash_chain import CHAIN_FIELDS, GENESIS_HASH, ChainError, HashChain, record_hash

__all__ = ["CHAIN_FIELDS", "GENESIS_HASH", "AuditError", "AuditLog", "record_hash", "verify"]

LABEL = "audit log"


class AuditError(ChainError):
    """The audit log is unreadable or its chain is broken, so the run's history cannot be trusted."""


def verify(path: Path, expected_last_hash: str | None = None) -> int:
    """Check the whole chain of the log at ``path`` and return its number of records.

    ``expected_last_hash`` is the hash the run's status.json recorded; when given,
    the last record must have it, which detects records removed from the end.
    Raises :class:`AuditError` naming the line and what is wrong.
    """
    return len(AuditLog(path).verify(expected_last_hash, expected_by="the latest checkpoint",
                                     mismatch_hint="the checkpoint belongs to another run"))


class AuditLog(HashChain):
    """Appends hash-chained records to a JSONL file; a missing file is an empty log.

    ``append(record)``, ``records()`` and ``last_hash()`` (for the next checkpoint's model card)
    come from :class:`shared.hash_chain.HashChain`; they raise :class:`AuditError`.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path, label=LABEL, error=AuditError)
