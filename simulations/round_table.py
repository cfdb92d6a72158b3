"""The round table printed at the end of a federated run: one row per round, global and per site."""

from __future__ import annotations

import json
import math
from pathlib import Path


SITE_NAMES = "site_names.json"
"""In a simulation's run folder: Flower's node name (``node-<id>``) -> the virtual hospital's name."""


def round_table(run_dir: Path) -> str:
    rounds = json.loads((Path(run_dir) / "metrics.json").read_text()) if (Path(run_dir) / "metrics.json").exists() \
        else []
    if not rounds:
        return "no round completed"
    names_file = Path(run_dir) / SITE_NAMES
    names = json.loads(names_file.read_text()) if names_file.exists() else {}
    sites = sorted({name for entry in rounds for name in entry["sites"]}, key=lambda s: names.get(s, s))
    header = f"{'round':>5} | {'loss':>6} | {'acc':>5} | {'sens':>5} | {'spec':>5} | {'AUC':>5} | " + \
        " | ".join(f"{_short(names.get(s, s)):>14}" for s in sites)
    lines = [header, "-" * len(header)]
    for entry in rounds:
        g = entry["global"]
        cells = []
        for name in sites:
            site = entry["sites"].get(name, {})
            cells.append(f"{'acc ' + _fmt(site.get('accuracy'), 2) + ' ε ' + _fmt(site.get('epsilon'), 1):>14}"
                         if site.get("examples") else f"{'sat out':>14}")
        lines.append(f"{entry['round']:>5} | {_fmt(g.get('loss'), 3):>6} | {_fmt(g.get('accuracy'), 2):>5} | "
                     f"{_fmt(g.get('sensitivity'), 2):>5} | {_fmt(g.get('specificity'), 2):>5} | "
                     f"{_fmt(g.get('auc'), 2):>5} | " + " | ".join(cells))
    shortened = [s for s in (names.get(s, s) for s in sites) if _short(s) != s]
    if shortened:
        lines.append("site columns: " + ", ".join(f"{_short(s)} = {s}" for s in shortened))
    return "\n".join(lines)


def _short(name: str) -> str:
    return name if len(name) <= 14 else name[:6] + "…" + name[-7:]


def _fmt(value, digits: int) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
