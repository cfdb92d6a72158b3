"""The round table printed at the end of a federated run: one row per round, global and per site."""

from __future__ import annotations

import json
from pathlib import Path

from shared.metrics import format_metric

SITE_NAMES = "site_names.json"
"""In a simulation's run folder: Flower's node name (``node-<id>``) -> the virtual hospital's name."""


GLOBAL_COLUMNS = (("loss", "loss", 3, 6), ("accuracy", "acc", 2, 5), ("sensitivity", "sens", 2, 5),
                  ("specificity", "spec", 2, 5), ("auc", "AUC", 2, 5))
"""(metric, heading, decimals, width) of the global model's columns, in order."""


def round_table(run_dir: Path) -> str:
    metrics_file = Path(run_dir) / "metrics.json"
    rounds = json.loads(metrics_file.read_text()) if metrics_file.exists() else []
    if not rounds:
        return "no round completed"
    names_file = Path(run_dir) / SITE_NAMES
    names = json.loads(names_file.read_text()) if names_file.exists() else {}
    sites = sorted({name for entry in rounds for name in entry["sites"]}, key=lambda s: names.get(s, s))
    header = " | ".join([f"{'round':>5}", *(f"{heading:>{width}}" for _, heading, _, width in GLOBAL_COLUMNS),
                         *(f"{_short(names.get(s, s)):>14}" for s in sites)])
    lines = [header, "-" * len(header)]
    for entry in rounds:
        cells = [f"{entry['round']:>5}"]
        cells += [f"{format_metric(entry['global'].get(metric), digits):>{width}}"
                  for metric, _, digits, width in GLOBAL_COLUMNS]
        for name in sites:
            site = entry["sites"].get(name, {})
            text = (f"acc {format_metric(site.get('accuracy'), 2)} ε {format_metric(site.get('epsilon'), 1)}"
                    if site.get("examples") else "sat out")
            cells.append(f"{text:>14}")
        lines.append(" | ".join(cells))
    shortened = [s for s in (names.get(s, s) for s in sites) if _short(s) != s]
    if shortened:
        lines.append("site columns: " + ", ".join(f"{_short(s)} = {s}" for s in shortened))
    return "\n".join(lines)


def _short(name: str) -> str:
    return name if len(name) <= 14 else name[:6] + "…" + name[-7:]

