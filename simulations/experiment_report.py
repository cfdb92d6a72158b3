"""An experiment's report: every cell as JSON and CSV, tables of mean ± std over seeds, plots.

Pure functions from a results table to files. A row is one cell of the grid (one seed)::

    {"cell": "fedavg_dp-eps8_alpha0.5_sites5_seed0", "setting": "fedavg_dp-eps8_alpha0.5_sites5",
     "strategy": "fedavg", "proximal_mu": None, "dp": True, "epsilon_target": 8.0, "alpha": 0.5,
     "sites": 5, "seed": 0, "accuracy": 0.81, "auc": 0.88, "sensitivity": ..., "specificity": ...,
     "balanced_accuracy": ..., "loss": ..., "epsilon": 7.99,
     "curve": [{"round": 1, "accuracy": ..., "auc": ...}, ...],        # federated cells
     "per_site": {"site-01": {"accuracy": ..., "auc": ...}, ...}}       # local-only cells

Rows of one ``setting`` differ only by seed; the tables and plots average over them. Missing
metrics (None or nan: an AUC on a one-class test set) stay absent, never become 0.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from matplotlib.figure import Figure

from shared.atomic_files import atomic_write, atomic_write_bytes, atomic_write_json
from shared.metrics import is_number, to_jsonable

METRICS = ("accuracy", "auc", "sensitivity", "specificity", "balanced_accuracy", "loss", "epsilon")
"""Final test-set metrics of a row, in the order of the CSV and the tables."""

TABLE_METRICS = (("accuracy", "accuracy"), ("auc", "AUC"), ("sensitivity", "sensitivity"),
                 ("specificity", "specificity"), ("epsilon", "ε spent"))
"""(metric, column title) of the Markdown table."""

SETTING_FIELDS = ("setting", "strategy", "proximal_mu", "dp", "epsilon_target", "alpha", "sites")
CSV_FIELDS = ("cell", *SETTING_FIELDS, "seed", *METRICS, "rounds", "seconds")

STRATEGY_ORDER = ("centralised", "fedavg", "fedprox", "local")
PLOTTED = (("accuracy", "accuracy"), ("auc", "ROC AUC"))


def write_report(rows: list[dict[str, Any]], out: Path, title: str = "Experiment") -> list[Path]:
    """``results.json``, ``results.csv``, ``report.md`` and its three PNGs in ``out``; returns their paths."""
    out = Path(out)
    rows = sorted(rows, key=_row_order)
    figures = {"curves.png": curves_figure(rows), "alpha.png": against_figure(rows, "alpha", "Dirichlet α"),
               "epsilon.png": against_figure(rows, "epsilon_target", "ε (DP target)")}
    atomic_write_json(out / "results.json", to_jsonable(rows))
    atomic_write_bytes(out / "results.csv", results_csv(rows).encode("utf-8"))
    for name, figure in figures.items():
        atomic_write(out / name, lambda handle, f=figure: f.savefig(handle, format="png", dpi=110))
    atomic_write_bytes(out / "report.md", report_markdown(rows, title).encode("utf-8"))
    return [out / name for name in ("report.md", "results.json", "results.csv", *figures)]


def results_csv(rows: list[dict[str, Any]]) -> str:
    """One line per cell, final metrics only (curves and per-site values are in the JSON)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for row in rows:
        values = {**row, "rounds": len(row.get("curve") or []) or None}
        writer.writerow(["" if (v := values.get(name)) is None or _nan(v) else v for name in CSV_FIELDS])
    return text.getvalue()


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per setting: its fields, the seeds, and (mean, std, n) of each metric over them."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["setting"]].append(row)
    summary = []
    for members in groups.values():
        entry = {name: members[0].get(name) for name in SETTING_FIELDS}
        entry["seeds"] = sorted(row["seed"] for row in members)
        for metric in METRICS:
            entry[metric] = mean_std(row.get(metric) for row in members)
        summary.append(entry)
    return sorted(summary, key=_row_order)


def mean_std(values: Iterable[Any]) -> tuple[float, float, int]:
    """Mean and sample standard deviation (0 for one value) of the defined values; nan when none is."""
    defined = [float(v) for v in values if is_number(v)]
    if not defined:
        return math.nan, math.nan, 0
    std = float(np.std(defined, ddof=1)) if len(defined) > 1 else 0.0
    return float(np.mean(defined)), std, len(defined)


def report_markdown(rows: list[dict[str, Any]], title: str) -> str:
    summary = summarise(rows)
    seeds = sorted({row["seed"] for row in rows})
    lines = [f"# {title}", "",
             f"{len(rows)} cells, {len(summary)} settings, seeds {', '.join(map(str, seeds))}. Every model is "
             "evaluated on the same held-out test set; values are mean ± std over seeds (n = seeds with a "
             "defined value). Local-only rows average the sites, each trained alone.", "",
             "## Final metrics on the test set", "",
             "| strategy | DP | sites | α | seeds | " + " | ".join(t for _, t in TABLE_METRICS) + " |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in TABLE_METRICS) + " |"]
    for entry in summary:
        cells = [strategy_label(entry), dp_label(entry), _plain(entry["sites"]), _plain(entry["alpha"]),
                 str(len(entry["seeds"]))] + [format_mean_std(entry[metric]) for metric, _ in TABLE_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    per_site = _per_site_table(rows)
    if per_site:
        lines += ["", "## Local-only, per site (mean over seeds)", "", *per_site]
    lines += ["", "## Figures", "",
              "Accuracy and AUC on the test set after each round (federated settings, mean over seeds):", "",
              "![accuracy and AUC per round](curves.png)", "",
              "Final metrics against the Dirichlet α of the label skew (smaller: more skewed):", "",
              "![final metrics against alpha](alpha.png)", "",
              "Final metrics against the DP target ε (dashed: the same setting without DP):", "",
              "![final metrics against epsilon](epsilon.png)", ""]
    return "\n".join(lines)


def _per_site_table(rows: list[dict[str, Any]]) -> list[str]:
    sites: dict[tuple[str, str], list[dict]] = defaultdict(list)
    labels = {}
    for row in rows:
        for site, metrics in (row.get("per_site") or {}).items():
            sites[(row["setting"], site)].append(metrics)
            labels[row["setting"]] = row
    if not sites:
        return []
    lines = ["| setting | site | accuracy | AUC |", "| --- | --- | --- | --- |"]
    for (setting, site), values in sorted(sites.items()):
        row = labels[setting]
        name = f"{dp_label(row)}, {_plain(row['sites'])} sites, α {_plain(row['alpha'])}"
        lines.append(f"| {name} | {site} | {format_mean_std(mean_std(v.get('accuracy') for v in values))} | "
                     f"{format_mean_std(mean_std(v.get('auc') for v in values))} |")
    return lines


def curves_figure(rows: list[dict[str, Any]]) -> Figure:
    """Accuracy and AUC against the round, one line per federated setting (mean over seeds, ± std band)."""
    figure = Figure(figsize=(13, 4.5), layout="constrained")
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("curve"):
            groups[row["setting"]].append(row)
    for axes, (metric, label) in zip(figure.subplots(1, len(PLOTTED)), PLOTTED, strict=True):
        for index, members in enumerate(groups.values()):
            by_round: dict[int, list] = defaultdict(list)
            for row in members:
                for point in row["curve"]:
                    by_round[point["round"]].append(point.get(metric))
            x = sorted(by_round)
            stats = [mean_std(by_round[r]) for r in x]
            mean = np.array([s[0] for s in stats])
            std = np.array([s[1] for s in stats])
            axes.plot(x, mean, marker="o", markersize=3, color=f"C{index % 10}", label=setting_label(members[0]))
            axes.fill_between(x, mean - std, mean + std, color=f"C{index % 10}", alpha=0.15, linewidth=0)
        _finish(axes, bool(groups), f"{label} per round", "round", label)
        axes.xaxis.get_major_locator().set_params(integer=True)
    if groups:
        figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    return figure


def against_figure(rows: list[dict[str, Any]], axis: str, axis_label: str) -> Figure:
    """Final accuracy and AUC against ``axis`` (alpha or the DP target ε), one line per other setting.

    A line joins settings that differ only in ``axis`` (and the seed); points are mean ± std over
    seeds. On the ε plot, the same setting without DP is a dashed horizontal line.
    """
    figure = Figure(figsize=(13, 4.5), layout="constrained")
    lines: dict[tuple, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    references: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        key = _line_key(row, axis)
        if is_number(row.get(axis)):
            lines[key][float(row[axis])].append(row)
        elif axis == "epsilon_target" and not row.get("dp"):
            references[key].append(row)
    for axes, (metric, label) in zip(figure.subplots(1, len(PLOTTED)), PLOTTED, strict=True):
        for index, (key, points) in enumerate(sorted(lines.items(), key=lambda kv: str(kv[0]))):
            color = f"C{index % 10}"
            x = sorted(points)
            stats = [mean_std(r.get(metric) for r in points[value]) for value in x]
            axes.errorbar(x, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", markersize=4,
                          capsize=3, color=color, label=setting_label(points[x[0]][0], without=axis))
            if key in references:
                reference = mean_std(r.get(metric) for r in references[key])[0]
                axes.axhline(reference, color=color, linestyle="--", linewidth=1)
        _finish(axes, bool(lines), f"final {label} against {axis_label}", axis_label, label)
        if axis == "alpha" and lines:
            axes.set_xscale("log")
    if lines:
        figure.legend(*figure.axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    return figure


def _finish(axes, drawn: bool, title: str, xlabel: str, ylabel: str) -> None:
    if not drawn:
        axes.text(0.5, 0.5, "no such cells in this experiment", ha="center", va="center",
                  transform=axes.transAxes, color="gray")
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)


def _line_key(row: dict[str, Any], axis: str) -> tuple:
    fields = [f for f in ("strategy", "proximal_mu", "dp", "epsilon_target", "alpha", "sites") if f != axis]
    if axis == "epsilon_target":
        fields.remove("dp")  # the DP line and its no-DP reference share a key
    return tuple(row.get(f) for f in fields)


def strategy_label(row: dict[str, Any]) -> str:
    name = row["strategy"]
    if name == "fedprox":
        return f"fedprox (μ={_plain(row.get('proximal_mu'))})"
    return {"local": "local-only (mean of sites)"}.get(name, name)


def dp_label(row: dict[str, Any]) -> str:
    return f"ε={_plain(row.get('epsilon_target'))}" if row.get("dp") else "no DP"


def setting_label(row: dict[str, Any], without: str | None = None) -> str:
    parts = [strategy_label(row)]
    if without != "epsilon_target":
        parts.append(dp_label(row))
    if without != "alpha" and row.get("alpha") is not None:
        parts.append(f"α={_plain(row['alpha'])}")
    if row.get("sites") is not None:
        parts.append(f"{row['sites']} sites")
    return ", ".join(parts)


def format_mean_std(stats: tuple[float, float, int]) -> str:
    mean, std, count = stats
    if count == 0:
        return "n/a"
    return f"{mean:.3f}" if count == 1 else f"{mean:.3f} ± {std:.3f}"


def _row_order(row: dict[str, Any]) -> tuple:
    strategy = row["strategy"]
    rank = STRATEGY_ORDER.index(strategy) if strategy in STRATEGY_ORDER else len(STRATEGY_ORDER)
    return (_sortable(row.get("sites")), _sortable(row.get("alpha")), bool(row.get("dp")),
            _sortable(row.get("epsilon_target")), rank, _sortable(row.get("proximal_mu")), row.get("seed", 0))


def _sortable(value: Any) -> tuple:
    return (0, 0.0) if value is None else (1, float(value))


def _plain(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
