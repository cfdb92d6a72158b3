"""Names of the hospitals behind SuperNode ids, for logs, reports and the audit log.

Sites never send their name (only numbers leave a site); the consortium knows which node id
belongs to which hospital from registration. Unknown ids are shown as ``node-<id>``.
"""

from __future__ import annotations

import json
from pathlib import Path


class SiteRegistry:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def names(self) -> dict[int, str]:
        if not self.path.is_file():
            return {}
        entries = json.loads(self.path.read_text()).get("sites", {})
        return {int(entry["node_id"]): name for name, entry in entries.items() if entry.get("node_id") is not None}

    def name_for(self, node_id: int) -> str:
        return self.names().get(int(node_id), f"node-{node_id}")
