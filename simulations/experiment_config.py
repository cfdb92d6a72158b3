"""A researcher's `exp.yaml`: one base simulation and the grid of variants to run around it.

    name: fedavg-vs-fedprox
    base_file: sim.yaml              # or `base:` with the sim.yaml settings inline
    grid:
      strategy: [fedavg, fedprox]
      proximal_mu: [0.01, 0.1]       # one FedProx cell per value
      dp: [false, true]
      epsilon: [1, 8]                # one DP cell per value
      alpha: [0.1, 0.5, 1.0]         # Dirichlet label skew (every cell then uses the dirichlet partition)
      sites: [3, 5]
      seeds: [0, 1, 2]               # a seed sets the data split, the stains and the training seed
    baselines: {centralised: true, local: true}

The grid is the cartesian product of its axes; ``epsilon`` only multiplies DP cells and
``proximal_mu`` only FedProx cells. Each baseline runs once per data setting and privacy
setting (sites, α, seed, DP/ε), so it sits beside the federated cells it is compared with.
Every cell's simulation config is built and validated at load time: a grid that cannot run
fails before any training, with the cell's name in the error.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from shared.yaml_config import ConfigError, check, load_config
from simulations.sim_config import SimConfig, load_sim_config, resolve_paths

Strategy = Literal["fedavg", "fedprox"]
BASELINES = ("centralised", "local")


def _every(rule, text: str):
    def checked(values: tuple) -> str | None:
        if not values:
            return "needs at least one value"
        if len(set(values)) != len(values):
            return "lists a value twice"
        return None if all(rule(v) for v in values) else text
    return checked


def _optional_every(rule, text: str):
    """An axis that may stay empty (then the base config's value is the only one)."""
    return lambda values: _every(rule, text)(values) if values else None


@dataclass(frozen=True)
class GridAxes:
    strategy: tuple[Strategy, ...] = check(_every(lambda v: True, ""), ("fedavg",))
    proximal_mu: tuple[float, ...] = check(_every(lambda v: v >= 0, "every value must be >= 0"), (0.01,))
    dp: tuple[bool, ...] = check(_every(lambda v: True, ""), (True,))
    epsilon: tuple[float, ...] = check(_every(lambda v: v > 0, "every value must be > 0"), (8.0,))
    alpha: tuple[float, ...] = check(_optional_every(lambda v: v > 0, "every value must be > 0"), ())
    sites: tuple[int, ...] = check(_optional_every(lambda v: v >= 1, "every value must be >= 1"), ())
    seeds: tuple[int, ...] = check(_every(lambda v: True, ""), (0,))


@dataclass(frozen=True)
class Baselines:
    centralised: bool = True  # one model on every site's training data pooled
    local: bool = True  # each site alone (the report shows the mean and every site)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a federated strategy, or a baseline, under one data and privacy setting."""

    strategy: Literal["fedavg", "fedprox", "centralised", "local"]
    dp: bool
    seed: int
    sites: int
    alpha: float | None = None  # Dirichlet α; None: the base config's partition is not Dirichlet
    epsilon: float | None = None  # the DP target; None without DP
    proximal_mu: float | None = None  # FedProx only

    @property
    def federated(self) -> bool:
        return self.strategy not in BASELINES

    @property
    def setting(self) -> str:
        """The cell's name without its seed: the rows a report averages."""
        strategy = self.strategy + (f"-mu{self.proximal_mu:g}" if self.proximal_mu is not None else "")
        privacy = f"dp-eps{self.epsilon:g}" if self.dp else "nodp"
        alpha = "" if self.alpha is None else f"_alpha{self.alpha:g}"
        return f"{strategy}_{privacy}{alpha}_sites{self.sites}"

    @property
    def name(self) -> str:
        return f"{self.setting}_seed{self.seed}"

    def row(self) -> dict:
        """The cell's fields as a report row starts them (``simulations/experiment_report.py``)."""
        return {"cell": self.name, "setting": self.setting, "strategy": self.strategy,
                "proximal_mu": self.proximal_mu, "dp": self.dp, "epsilon_target": self.epsilon,
                "alpha": self.alpha, "sites": self.sites, "seed": self.seed}


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    base_file: Path | None = None  # a sim.yaml (its relative paths are from its own folder)
    base: SimConfig | None = None  # or the sim.yaml settings inline (relative paths from this file's folder)
    grid: GridAxes = field(default_factory=GridAxes)
    baselines: Baselines = field(default_factory=Baselines)
    out_dir: Path | None = None  # default: experiments/<name> beside exp.yaml

    def __post_init__(self) -> None:
        if (self.base_file is None) == (self.base is None):
            raise ValueError("set exactly one of 'base_file' (a sim.yaml) or 'base' (its settings inline)")

    def cells(self) -> list[Cell]:
        """Every cell of the grid, baselines included, in the order they run."""
        return expand_grid(self.grid, self.baselines, self.sim.simulation.sites, _base_alpha(self.sim))

    @property
    def sim(self) -> SimConfig:
        assert self.base is not None, "load_experiment_config resolves base_file into base"
        return self.base


def expand_grid(grid: GridAxes, baselines: Baselines, base_sites: int, base_alpha: float | None) -> list[Cell]:
    """The cartesian product of the axes; empty ``sites``/``alpha`` axes take the base config's value."""
    privacy = [(dp, epsilon) for dp in grid.dp for epsilon in (grid.epsilon if dp else (None,))]
    strategies = [(name, mu) for name in grid.strategy for mu in (grid.proximal_mu if name == "fedprox" else (None,))]
    baseline_names = [name for name in BASELINES if getattr(baselines, name)]
    cells = []
    for sites, alpha, (dp, epsilon), seed in itertools.product(grid.sites or (base_sites,), grid.alpha or (base_alpha,),
                                                                 privacy, grid.seeds):
        common = {"dp": dp, "epsilon": epsilon, "seed": seed, "sites": sites, "alpha": alpha}
        cells += [Cell(strategy=name, proximal_mu=mu, **common) for name, mu in strategies]
        cells += [Cell(strategy=name, **common) for name in baseline_names]
    return cells


def cell_config(base: SimConfig, cell: Cell) -> SimConfig:
    """The base simulation with the cell's strategy, privacy, split and seed; ValueError if it cannot run."""
    sim = base.simulation
    partition = sim.partition if cell.alpha is None else replace(sim.partition, scheme="dirichlet", alpha=cell.alpha)
    simulation = replace(sim, sites=cell.sites, seed=cell.seed, partition=partition,
                         # the cell is scored on the test set: its sites spend no ε on evaluation releases
                         site_privacy=replace(sim.site_privacy, enabled=cell.dp, release_evaluation=False))
    privacy = replace(base.privacy, required=cell.dp, epsilon=cell.epsilon if cell.dp else base.privacy.epsilon)
    strategy = base.strategy
    if cell.federated:
        strategy = replace(strategy, name=cell.strategy, proximal_mu=cell.proximal_mu or 0.0)
    return replace(base, strategy=strategy, privacy=privacy, training=replace(base.training, seed=cell.seed),
                   simulation=simulation)


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    """Load exp.yaml and its base simulation; every cell of the grid is checked (``check_cells``)."""
    path = Path(path)
    config = load_config(ExperimentConfig, path)
    folder = path.resolve().parent
    if config.base_file is not None:
        base = load_sim_config(config.base_file)
    else:  # as load_sim_config does: weights and the feature store (default cache/) from this file's folder
        base = resolve_paths(config.sim, folder)
    config = replace(config, base_file=None, base=base,
                     out_dir=config.out_dir or folder / "experiments" / _slug(config.name))
    return check_cells(config, str(path))


def check_cells(config: ExperimentConfig, source: str) -> ExperimentConfig:
    """``config`` if every cell's simulation config is valid; else a ConfigError naming each bad cell."""
    problems = []
    for cell in config.cells():
        try:
            cell_config(config.sim, cell)
        except ValueError as exc:  # a SettingError names its setting (a cell is no file, it has no lines)
            problems.append(f"{source}: grid cell {cell.name}: {exc}")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return config


def _base_alpha(sim: SimConfig) -> float | None:
    return sim.simulation.partition.alpha if sim.simulation.partition.scheme == "dirichlet" else None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-") or "experiment"
