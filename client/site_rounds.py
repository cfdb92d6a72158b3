"""The site's own record of every federated round: what it computed, spent and kept to itself.

Per-site numbers no longer leave the site (only the masked sum and the ``disclose:`` list do), so
the hospital keeps them here: one JSON line per round in ``state_dir/rounds/<federation>.jsonl``
(training patients and loss, the exact validation metrics of the model it received, ε spent,
refusals). `fedpath-site status` reads them; so does the demo's round table, which plays every
hospital at once.
"""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from client.site_config import SiteConfig
from shared.atomic_files import atomic_write_bytes
from shared.metrics import to_jsonable


def rounds_file(config: SiteConfig, federation_id: str) -> Path:
    return Path(config.state_dir) / "rounds" / f"{federation_id}.jsonl"


def record_round(config: SiteConfig, federation_id: str, record: dict) -> None:
    """Append one round's record (appends are atomic enough for one writer: the site's one runner)."""
    path = rounds_file(config, federation_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(to_jsonable({"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record}),
                      sort_keys=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def read_rounds(config: SiteConfig, federation_id: str) -> list[dict]:
    """The records of one federation, oldest first (a torn last line from a crash is skipped)."""
    path = rounds_file(config, federation_id)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def federations(config: SiteConfig) -> list[str]:
    """Federations this site took part in (ledgers or round records), oldest name first."""
    state = Path(config.state_dir)
    names = {p.stem for p in (state / "ledgers").glob("*.json")} | {p.stem for p in (state / "rounds").glob("*.jsonl")}
    return sorted(names)


def sent_reply_path(config: SiteConfig, federation_id: str, round_: int, attempt: int = 0) -> Path:
    """Where the reply of a round's ``attempt`` is kept (0: the first; a retried round spends and sends again)."""
    retry = f"-retry{attempt}" if attempt else ""
    return Path(config.state_dir) / "sent" / federation_id / f"round-{round_:04d}{retry}.npz"


def keep_reply(config: SiteConfig, federation_id: str, round_: int, arrays: list[np.ndarray]) -> Path:
    """A copy of the reply vector as it left the ClientApp (before SecAgg+ masks it), for the site's audits."""
    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    attempt = 0
    while (path := sent_reply_path(config, federation_id, round_, attempt)).exists():
        attempt += 1  # never overwrite what already left: each attempt is kept
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue(), 0o600)
    return path
