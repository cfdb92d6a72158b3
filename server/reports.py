"""What a person reads after a run: the metrics as JSON and CSV, learning curves, a console line.

``rounds`` is the server's history, one entry per scored model (round 0 is the initial model)::

    {"round": 3, "global": {"accuracy": 0.81, "auc": 0.80, "examples": 120, ...},
     "sites": {"hospital-a": {"epsilon": 2.9, "refused": 0, "trained": true}, ...}}

Global metrics come from the masked sum of the sites' noisy evaluation counts; per site there is
only what a hospital discloses (by default its ε and refusal code).

Metrics may be missing, None or nan (a one-class validation set has no AUC); every output
shows them as absent rather than failing or inventing a value. The CSV is in long format
(``round,scope,metric,value``) so spreadsheets and pandas can pivot it any way without
knowing the metric names in advance.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from shared.atomic_files import atomic_write, atomic_write_bytes, atomic_write_json
from shared.metrics import format_metric, is_number, to_jsonable

GLOBAL = "global"
"""The scope of the aggregated model's metrics, beside one scope per site."""

PANELS = (
    ("Accuracy", "accuracy", (("accuracy", "-"), ("balanced_accuracy", "--"))),
    ("Sensitivity / specificity", "rate", (("sensitivity", "-"), ("specificity", "--"))),
    ("AUC", "ROC AUC", (("auc", "-"),)),
    ("ε spent per site", "ε", (("epsilon", "-"),)),
)
"""(title, y label, ((metric, line style), ...)) of each subplot of ``curves.png``."""

LINE_LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "sensitivity": "sensitivity",
               "specificity": "specificity"}
"""How the line styles of a panel with two metrics are named in the legend."""

CONSOLE_METRICS = (("accuracy", "acc"), ("balanced_accuracy", "bal"), ("sensitivity", "sens"),
                   ("specificity", "spec"), ("auc", "AUC"))
"""(metric, short name) of the global metrics on the console line, in order."""


def write_reports(run_dir: Path, rounds: list[dict[str, Any]], curves: bool = True) -> None:
    """Write ``metrics.json``, ``metrics.csv`` and (unless ``curves`` is False) ``curves.png`` into
    ``run_dir``, each atomically."""
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "metrics.json", to_jsonable(rounds))
    atomic_write_bytes(run_dir / "metrics.csv", _csv_bytes(rounds))
    if not curves:
        return
    figure = _curves(rounds)
    atomic_write(run_dir / "curves.png", lambda handle: figure.savefig(handle, format="png", dpi=120))


def round_line(entry: dict[str, Any]) -> str:
    """One console line per round: global metrics, number of sites, the largest ε of any site.

    ε is per site (each hospital spends its own budget), so the largest one is what a budget
    is closest to running out.
    """
    trained = sum(1 for site in entry.get("sites", {}).values() if site.get("trained"))
    parts = [f"round {entry['round']:>2}", f"sites {trained}"]
    metrics = entry.get("global", {})
    parts += [f"{short} {format_metric(metrics.get(name))}" for name, short in CONSOLE_METRICS]
    epsilons = [value for site in entry.get("sites", {}).values() if is_number(value := site.get("epsilon"))]
    parts.append(f"ε max {format_metric(max(epsilons) if epsilons else None, 2)}")
    return " | ".join(parts)


def _scopes(entry: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(GLOBAL, entry.get("global", {})), *entry.get("sites", {}).items()]


def _csv_bytes(rounds: list[dict[str, Any]]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["round", "scope", "metric", "value"])
    for entry in rounds:
        for scope, metrics in _scopes(entry):
            for metric, value in metrics.items():
                writer.writerow([entry["round"], scope, metric, repr(float(value)) if is_number(value) else ""])
    return text.getvalue().encode("utf-8")


def _curves(rounds: list[dict[str, Any]]) -> Figure:
    """One row of panels (loss, accuracy, AUC) over rounds: global thick and black, sites thin."""
    sites = list(dict.fromkeys(site for entry in rounds for site in entry.get("sites", {})))
    colors = {GLOBAL: "black"} | {site: f"C{i % 10}" for i, site in enumerate(sites)}
    widths = {GLOBAL: 2.5} | {site: 1.0 for site in sites}
    x = [entry["round"] for entry in rounds]

    figure = Figure(figsize=(19, 4.5), layout="constrained")
    for axes, (title, ylabel, lines) in zip(figure.subplots(1, len(PANELS), sharex=True), PANELS, strict=True):
        drawn = False
        for scope in [GLOBAL, *sites]:
            for metric, style in lines:
                y = [_value(entry, scope, metric) for entry in rounds]
                if all(math.isnan(value) for value in y):
                    continue
                axes.plot(x, y, style, color=colors[scope], linewidth=widths[scope], marker="o",
                          markersize=1.5 * widths[scope])
                drawn = True
        if not drawn:
            axes.text(0.5, 0.5, "not reported", ha="center", va="center", transform=axes.transAxes, color="gray")
        axes.set_title(title)
        axes.set_xlabel("round")
        axes.set_ylabel(ylabel)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if x:  # half a round of margin: a single round gets a tick of its own, not 0.995 ... 1.005
            axes.set_xlim(min(x) - 0.5, max(x) + 0.5)
        axes.grid(alpha=0.3)

    handles = [Line2D([], [], color=colors[scope], linewidth=widths[scope], label=scope) for scope in [GLOBAL, *sites]]
    handles += [Line2D([], [], color="gray", linestyle=style, label=LINE_LABELS[metric])
                for _, _, lines in PANELS for metric, style in lines if metric in LINE_LABELS]
    figure.legend(handles=handles, loc="outside right upper", fontsize="small")
    return figure


def _value(entry: dict[str, Any], scope: str, metric: str) -> float:
    """The metric as a float; nan when the round did not report it (a gap in the line)."""
    metrics = entry.get(GLOBAL, {}) if scope == GLOBAL else entry.get("sites", {}).get(scope, {})
    value = metrics.get(metric)
    return float(value) if is_number(value) else math.nan

