"""The hospitals the consortium registered: name, SuperNode id and public key, in one JSON file.

Registration happens at the SuperLink (``flwr supernode register``: only registered keys may
connect, and an authenticated node keeps its id); this file keeps the names, so logs, reports
and the audit log say which hospital a node id is. Sites never send their name: only numbers
leave a site. Unknown ids are shown as ``node-<id>``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from shared.atomic_files import atomic_write_json
from shared.errors import UserError
from shared.site_keys import site_name_problem

log = logging.getLogger("fedpath.server")


class RegistryError(UserError):
    pass


ENTRY_FIELDS = {"node_id": int, "public_key": str, "fingerprint": str, "registered": str}


class SiteRegistry:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._last_names: dict[int, str] | None = None  # the last names read whole (``name_for``)

    def entries(self) -> dict[str, dict]:
        """Every registered site by name. Raises RegistryError, saying what is wrong where, for a file
        that cannot be read or is not a registry (a hand edit, a disk fault)."""
        if not self.path.is_file():
            return {}
        try:
            document = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{self.path}: unreadable site registry ({exc})") from None
        sites = document.get("sites", {}) if isinstance(document, dict) else None
        if not isinstance(sites, dict):
            raise RegistryError(f"{self.path}: not a site registry: expected {{\"sites\": {{NAME: {{...}}}}}}")
        for name, entry in sites.items():
            for field, kind in ENTRY_FIELDS.items():
                value = entry.get(field) if isinstance(entry, dict) else None
                if not isinstance(value, kind) or isinstance(value, bool):
                    raise RegistryError(f"{self.path}: sites.{name}.{field}: expected {kind.__name__}, "
                                        f"found {type(value).__name__ if value is not None else 'nothing'}")
        return dict(sites)

    def names(self) -> dict[int, str]:
        return {entry["node_id"]: name for name, entry in self.entries().items()}

    def name_for(self, node_id: int) -> str:
        """The registered name of ``node_id``, else ``node-<id>``. A registry broken while a run reads it
        (a hand edit, a disk fault) names nodes as last read whole, with a warning, rather than failing
        the run; broken from the start, RegistryError."""
        try:
            self._last_names = self.names()
        except RegistryError as exc:
            if self._last_names is None:
                raise
            log.warning("%s; naming sites as last read", exc)
        return self._last_names.get(int(node_id), f"node-{node_id}")

    def check_new(self, name: str, public_key: str) -> None:
        """Refuse a name a site cannot have (``site_name_problem``: the site's own name names its key files),
        or a name or a key that is already registered, before the SuperLink is asked."""
        if problem := site_name_problem(name):
            raise RegistryError(f"site name {name!r}: {problem}, as the hospital's own site.yaml `name:`")
        for existing, entry in self.entries().items():
            if existing == name:
                raise RegistryError(f"a site named '{name}' is already registered (node {entry['node_id']}); "
                                    f"`fedpath-server remove-site {name} --config SERVER_YAML` first to replace "
                                    "its key")
            if entry["public_key"] == public_key:
                raise RegistryError(f"this key is already registered as site '{existing}'")

    def add(self, name: str, node_id: int, public_key: str, fingerprint: str) -> None:
        entries = self.entries()
        entries[name] = {"node_id": int(node_id), "public_key": public_key, "fingerprint": fingerprint,
                         "registered": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._write(entries)

    def entry(self, name: str) -> dict:
        return _named(self.entries(), name)

    def remove(self, name: str) -> dict:
        entries = self.entries()
        entry = _named(entries, name)
        del entries[name]
        self._write(entries)
        return entry

    def _write(self, entries: dict[str, dict]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # the state folder: the server's user only
        atomic_write_json(self.path, {"sites": entries})


def _named(entries: dict[str, dict], name: str) -> dict:
    if name not in entries:
        known = ", ".join(sorted(entries)) or "none"
        raise RegistryError(f"no registered site named '{name}' (registered: {known})")
    return entries[name]
