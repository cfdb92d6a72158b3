"""The demo's own scoring: every round's global model on the validation slides of all its hospitals.

In a real consortium nobody holds every hospital's validation slides; the sites release noisy
evaluation counts instead (``docs/federation.md``). The demo plays every hospital, and its few
dozen validation patients make such counts too noisy to read, so its hospitals release none
(``privacy.release_evaluation: false``) and the demo scores each checkpoint itself, exactly, on
the pooled validation slides: the same ``evaluate`` as the sites, the same ``curves.png`` and
``metrics.csv`` as a run folder (``server.reports.write_reports``), in a folder of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

from client.sequence_data import SlideFeatures
from client.train_local import evaluate
from client.trained_model import load_model
from server.reports import CONSOLE_METRICS, GLOBAL, write_reports
from shared.checkpoints import saved_rounds
from shared.metrics import format_metric
from simulations.sim_runner import cached_items


def score_rounds(run_dir: Path, site_yamls: list[Path], out: Path) -> list[dict]:
    """Score every saved round of ``run_dir`` on the validation items of ``site_yamls``; write the
    reports into ``out`` and return their entries (``round``, ``global`` metrics)."""
    from client.site_config import load_site_config

    trunk = load_site_config(site_yamls[0]).features.backbone_weights
    server_rounds = run_dir / "metrics.json"  # the sites' disclosed ε, round by round, for the ε panel
    disclosed = {entry["round"]: {site: {"epsilon": values.get("epsilon")} for site, values in entry["sites"].items()}
                 for entry in (json.loads(server_rounds.read_text()) if server_rounds.exists() else [])}
    entries = []
    for round_, checkpoint in saved_rounds(run_dir):
        model = load_model(checkpoint, trunk)
        slides: list[SlideFeatures] = [item for path in site_yamls for item in cached_items(path, "val", model.classes)]
        metrics = evaluate(model.head, slides, list(model.classes), model.length, model.positive_class)
        entries.append({"round": round_, GLOBAL: {**metrics, "val_patients": len({s.patient for s in slides})},
                        "sites": disclosed.get(round_, {})})
    out.mkdir(parents=True, exist_ok=True)
    write_reports(out, entries)
    return entries


def validation_table(entries: list[dict]) -> str:
    """Round by round: the global model's exact metrics on the pooled validation slides."""
    header = " | ".join([f"{'round':>5}", *(f"{heading:>5}" for _, heading in CONSOLE_METRICS)])
    lines = [header, "-" * len(header)]
    for entry in entries:
        lines.append(" | ".join([f"{entry['round']:>5}", *(f"{format_metric(entry[GLOBAL].get(key), 2):>5}"
                                                           for key, _ in CONSOLE_METRICS)]))
    patients = entries[-1][GLOBAL]["val_patients"] if entries else 0
    lines.append(f"each round's global model on the {patients} validation patients of all the demo's hospitals, "
                 "scored by the demo (which plays every hospital); round 0 is the initial model")
    return "\n".join(lines)
