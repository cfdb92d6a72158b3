"""The hospitals the consortium registered: name, SuperNode id and public key, in one JSON file.

Registration happens at the SuperLink (``flwr supernode register``: only registered keys may
connect, and an authenticated node keeps its id); this file keeps the names, so logs, reports
and the audit log say which hospital a node id is. Sites never send their name: only numbers
leave a site. Unknown ids are shown as ``node-<id>``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from shared.atomic_files import atomic_write_json
from shared.errors import UserError


class RegistryError(UserError):
    pass


class SiteRegistry:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def entries(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        try:
            return dict(json.loads(self.path.read_text()).get("sites", {}))
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{self.path}: unreadable site registry ({exc})") from None

    def names(self) -> dict[int, str]:
        return {int(entry["node_id"]): name for name, entry in self.entries().items()}

    def name_for(self, node_id: int) -> str:
        return self.names().get(int(node_id), f"node-{node_id}")

    def check_new(self, name: str, public_key: str) -> None:
        """Refuse a name or a key that is already registered, before the SuperLink is asked."""
        for existing, entry in self.entries().items():
            if existing == name:
                raise RegistryError(f"a site named '{name}' is already registered (node {entry['node_id']}); "
                                    f"`fedpath-server remove-site {name}` first to replace its key")
            if entry["public_key"] == public_key:
                raise RegistryError(f"this key is already registered as site '{existing}'")

    def add(self, name: str, node_id: int, public_key: str, fingerprint: str) -> None:
        entries = self.entries()
        entries[name] = {"node_id": int(node_id), "public_key": public_key, "fingerprint": fingerprint,
                         "registered": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._write(entries)

    def remove(self, name: str) -> dict:
        entries = self.entries()
        if name not in entries:
            known = ", ".join(sorted(entries)) or "none"
            raise RegistryError(f"no registered site named '{name}' (registered: {known})")
        entry = entries.pop(name)
        self._write(entries)
        return entry

    def _write(self, entries: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"sites": entries})
