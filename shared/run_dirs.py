"""One folder per run, named by its start time: local training runs and federated runs alike."""

from __future__ import annotations

import time
from pathlib import Path

from shared.errors import UserError


def new_run_dir(parent: Path) -> Path:
    """``parent/<YYYYmmdd-HHMMSS>``, with a suffix when two runs start within the same second."""
    parent = Path(parent)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        folder = parent / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise UserError(f"{parent}: cannot create a new run folder for {stamp}")
