"""`fedpath-sim split`: what each virtual hospital would hold, before anything is trained.

A table (class counts, patients, train/val items per site, then the held-out test set) and a
bar chart of class counts per site, from the same split `fedpath-sim run` uses. No feature is
computed (generated slides are made once if the pool does not exist yet).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from client.prepare import format_table
from shared.atomic_files import atomic_write_json
from simulations.materialise import feature_store
from simulations.sim_config import SimConfig
from simulations.site_split import SiteSplit, pool_items, split_sites


def preview_split(config: SimConfig, out: Path, progress: bool = True) -> tuple[str, Path]:
    """Write split.txt, split.json and split.png into ``out``; the table and the chart's path."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    items, unused = pool_items(config, feature_store(config, out), progress)
    split = split_sites(config, items, unused)
    record = split.record(config)
    rows = record["sites"]
    table = split_table(config, rows, split)
    (out / "split.txt").write_text(table + "\n")
    atomic_write_json(out / "split.json", record)
    chart = out / "split.png"
    split_chart(rows, config.classes, chart, title=_title(config))
    return table, chart


def split_table(config: SimConfig, rows: list[dict], split: SiteSplit) -> str:
    header = ("site", *config.classes, "items", "patients", "train", "val", "test")
    body = [tuple(str(row[key]) for key in header) for row in rows]
    note = f"{_title(config)}; seed {config.simulation.seed}"
    if split.unused:
        note += f"; {split.unused} source item(s) of no configured class left out"
    return f"{note}\n{format_table(header, body)}"


def split_chart(rows: list[dict], classes: tuple[str, ...], path: Path, title: str) -> None:
    """Stacked bars: items of each class at every site, the test set last."""
    figure = Figure(figsize=(max(5.0, 0.45 * len(rows) + 2), 3.6), layout="constrained")
    axes = figure.subplots()
    names = [row["site"] for row in rows]
    bottom = [0] * len(rows)
    for name in classes:
        counts = [row[name] for row in rows]
        axes.bar(names, counts, bottom=bottom, label=name)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    axes.set_ylabel("items")
    axes.set_title(title)
    axes.legend(fontsize="small")
    axes.tick_params(axis="x", labelrotation=60, labelsize="small")
    figure.savefig(path, dpi=110)


def _title(config: SimConfig) -> str:
    sim = config.simulation
    scheme = {"iid": "IID", "dirichlet": f"Dirichlet α={sim.partition.alpha:g}",
              "quantity": f"quantity skew β={sim.partition.beta:g}"}[sim.partition.scheme]
    shift = f", stain shift {sim.stain_shift.strength:g}" if sim.stain_shift.strength > 0 else ""
    return f"{sim.sites} sites, {scheme}{shift}"
