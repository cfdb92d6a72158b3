"""The round table printed at the end of a federated run: one row per scored model, global and per site.

The global columns are what the server read from the masked sum of the sites' noisy evaluation
counts. Per site the server knows only what a hospital discloses (ε, refusals); the demo and the
simulations play every hospital, so they may also show each site's own exact validation accuracy,
read from the sites' local round records (``client/site_rounds.py``), as a hospital would see it.
"""

from __future__ import annotations

import json
from pathlib import Path

from client.site_config import SiteConfig
from client.site_rounds import read_rounds
from server.reports import CONSOLE_METRICS
from shared.metrics import format_metric

SITE_NAMES = "site_names.json"
"""In a simulation's run folder: Flower's node name (``node-<id>``) -> the virtual hospital's name."""


def round_table(run_dir: Path, sites: dict[str, SiteConfig] | None = None) -> str:
    """The table of ``run_dir``; ``sites`` (hospital name -> its config) adds each site's own accuracy."""
    run_dir = Path(run_dir)
    rounds = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else []
    if not rounds:
        return "no round completed"
    names_file = run_dir / SITE_NAMES
    names = json.loads(names_file.read_text()) if names_file.exists() else {}
    columns = sorted({name for entry in rounds for name in entry["sites"]}, key=lambda s: names.get(s, s))
    local = _local_accuracy(run_dir.name, sites or {})
    header = " | ".join([f"{'round':>5}", *(f"{heading:>5}" for _, heading in CONSOLE_METRICS),
                         *(f"{_short(names.get(s, s)):>16}" for s in columns)])
    lines = [header, "-" * len(header)]
    for entry in rounds:
        g = entry["global"]
        cells = []
        for name in columns:
            site = entry["sites"].get(name, {})
            accuracy = local.get((names.get(name, name), entry["round"]))
            own = "" if accuracy is None else f"acc {format_metric(accuracy, 2)} "
            text = "sat out" if site.get("refused") else f"{own}ε {format_metric(site.get('epsilon'), 1)}"
            cells.append(f"{text:>16}")
        numbers = [f"{format_metric(g.get(key), 2):>5}" for key, _ in CONSOLE_METRICS]
        lines.append(" | ".join([f"{entry['round']:>5}", *numbers, *cells]))
    lines.append("round 0 is the initial model; global columns: the federation's validation patients, from the "
                 "masked sum of the sites' noisy counts" + ("; acc per site: the site's own exact validation accuracy"
                                                            if local else ""))
    shortened = [s for s in (names.get(s, s) for s in columns) if _short(s) != s]
    if shortened:
        lines.append("site columns: " + ", ".join(f"{_short(s)} = {s}" for s in shortened))
    return "\n".join(lines)


def _local_accuracy(federation_id: str, sites: dict[str, SiteConfig]) -> dict[tuple[str, int], float]:
    """(site, model round) -> the site's exact validation accuracy of that model: the record of the exchange
    after it (round + 1), in which the site scored the model it received."""
    out = {}
    for name, config in sites.items():
        for record in read_rounds(config, federation_id):
            if "val" in record and record["val"].get("accuracy") is not None:
                out[(name, int(record["round"]) - 1)] = float(record["val"]["accuracy"])
    return out


def _short(name: str) -> str:
    return name if len(name) <= 16 else name[:7] + "…" + name[-8:]

