"""How a simulated federation's time and memory grow with the number of virtual hospitals.

`fedpath-sim run` end to end on Flower's Simulation Engine (Ray, one core per site, DP at every
site), with the feature caches prepared beforehand (not timed): the same generated slides dealt
IID to 5, 10 and 20 sites, a fixed number of rounds each. ``run_seconds`` is the whole run
(SuperLink and Ray start-up, every round, the test evaluation); ``round_seconds`` the mean of
rounds 2+ (round 1 also starts Ray's workers). ``peak_rss_gb`` is the largest sum of the resident
memory of this process and every process below it, sampled twice a second: an upper bound, as
pages shared between processes count once per process.

Ray keeps as many workers as cores allow whatever the number of sites, so the worker memory is
not where growth would show. What could grow with the sites is the server's side: the process
that runs the ServerApp (and drives Ray) holds every site's reply of a round, per-site metrics
and the strategy's state. So the peak is also kept per kind of process, and one more case runs
100 sites (on more slides, so that each site keeps a few patients) to see whether that
process's peak grows with them.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

from simulations.materialise import materialise
from simulations.process_tree import PeakMemory, command_line
from simulations.sim_config import SimConfig, parse_sim_config
from simulations.sim_runner import run_simulation


def process_kind(pid: int, benchmark_pid: int) -> str:
    """What a process of the simulation's tree is, from its command line."""
    command = command_line(pid)
    if pid == benchmark_pid:
        return "benchmark"
    if "flwr-simulation" in command:
        return "serverapp"  # the ServerApp's thread and Ray's driver share this process
    if command.startswith("ray::"):
        return "ray_workers"  # ClientApp actors, named by Ray
    if "flower-superlink" in command:
        return "superlink"
    return "other"  # Ray's own services, Flower's executor, the flwr CLI


def config(sites: int, rounds: int, slides: int, size: int, store: Path) -> SimConfig:
    return parse_sim_config({
        "classes": ["adenoma", "adenocarcinoma"], "positive_class": "adenocarcinoma",
        "federation": {"rounds": rounds, "min_sites": 2, "round_timeout": 600},
        "training": {"epochs": 1, "batch_size": 2, "learning_rate": 0.003},
        "simulation": {"sites": sites, "seed": 0, "data": {"generated": {"slides": slides, "size": size}},
                       "test_fraction": 0.2, "val_fraction": 0.2,
                       "tiling": {"target_mpp": 1.0, "tile_size": 96, "min_tissue": 0.4, "mask_size": 256},
                       "features": {"batch_size": 32, "num_workers": 0, "cache_dir": str(store)},
                       "backend": {"cpus_per_site": 1}}}, "sim_scale")


def measure(cfg: SimConfig, folder: Path) -> dict:
    """One simulation: materialised first (not timed), then run with its memory sampled."""
    layout = materialise(cfg, folder, progress=False)
    start = time.perf_counter()
    me = os.getpid()
    with PeakMemory(kind=lambda pid: process_kind(pid, me)) as memory:
        run_dir = run_simulation(cfg, layout, folder)
    seconds = time.perf_counter() - start
    # round 0 is the initial model (no exchange made it): every other entry times the exchange that trained it
    timing = [entry["timing"]["round_s"] for entry in json.loads((run_dir / "metrics.json").read_text())
              if entry["round"] >= 1]
    section = cfg.simulation
    partition = section.partition.scheme + {"iid": "", "dirichlet": f" alpha={section.partition.alpha:g}",
                                            "quantity": f" beta={section.partition.beta:g}"}[section.partition.scheme]
    row = {"sites": section.sites, "rounds": cfg.federation.rounds, "slides": section.data.generated.slides,
           "slide_px": section.data.generated.size, "partition": partition, "dp": section.site_privacy.enabled,
           "cpus_per_site": section.backend.cpus_per_site, "run_seconds": round(seconds, 1),
           "round_seconds": round(statistics.mean(timing[1:] or timing), 2),
           "first_round_seconds": round(timing[0], 1), "peak_rss_gb": round(memory.peak / 1e9, 2),
           "peak_rss_gb_by_process": {kind: round(rss / 1e9, 2) for kind, rss in sorted(memory.peak_by_kind.items())}}
    print(json.dumps(row), flush=True)
    return row


def run(quick: bool) -> dict:
    # Quick is small: a simulation's start-up (SuperLink, Ray, a worker per core importing torch and
    # Opacus) alone takes most of a minute here.
    site_counts, rounds, slides, size = ((3,), 2, 12, 512) if quick else ((5, 10, 20), 10, 60, 768)
    # Many sites: about 5 patients each (4 for training and validation, the rest held out for the test).
    many_sites, many_rounds, many_slides = (10, 1, 60) if quick else (100, 3, 620)
    logging.getLogger("fedpath.site").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        rows = [measure(config(sites, rounds, slides, size, store), Path(tmp) / f"sites-{sites}")
                for sites in site_counts]
        many = measure(config(many_sites, many_rounds, many_slides, 512, store), Path(tmp) / f"many-{many_sites}")
    return {"cores": os.cpu_count(), "sites": [r["sites"] for r in rows],
            "run_seconds": [r["run_seconds"] for r in rows], "peak_rss_gb": [r["peak_rss_gb"] for r in rows],
            "serverapp_peak_rss_gb": [r["peak_rss_gb_by_process"].get("serverapp") for r in rows],
            "rows": rows, "many_sites": many}
