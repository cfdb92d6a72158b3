"""Files that are either the old version or the new one, never half-written.

Caches, ledgers, checkpoints and metrics are all written this way: a temporary file beside the
target, flushed and fsynced, renamed over it, then the folder fsynced so the rename survives a
power cut. A run killed at any point leaves only complete files, and the next run resumes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """``mode`` (e.g. 0o600 for private keys) is set on the temporary file before any byte is
    written, whatever the umask; ``mkstemp`` already creates it owner-only."""
    def write(handle: BinaryIO) -> None:
        if mode is not None:
            os.fchmod(handle.fileno(), mode)
        handle.write(data)

    atomic_write(path, write)


def atomic_write_json(path: Path, document: Any) -> None:
    """Strict JSON (NaN refused: pass metrics through ``to_jsonable`` first), indented, newline-ended."""
    atomic_write_bytes(path, (json.dumps(document, indent=2, allow_nan=False) + "\n").encode())
