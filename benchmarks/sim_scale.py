"""How a simulated federation's time and memory grow with the number of virtual hospitals.

`fedpath-sim run` end to end on Flower's Simulation Engine (Ray, one core per site, DP at every
site), with the feature caches prepared beforehand (not timed): the same generated slides dealt
IID to 5, 10 and 20 sites, a fixed number of rounds each. ``seconds`` is the whole run (SuperLink
and Ray start-up, every round, the test evaluation); ``round_seconds`` the mean of rounds 2+
(round 1 also starts Ray's workers). ``peak_rss_gb`` is the largest sum of the resident memory of
this process and every process below it, sampled twice a second: an upper bound, as pages shared
between processes count once per process.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from simulations.materialise import materialise
from simulations.process_tree import descendants, rss_bytes
from simulations.sim_config import parse_sim_config
from simulations.sim_runner import run_simulation


class PeakMemory:
    """Peak resident memory of this process tree while the ``with`` block runs."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak = interval, 0
        self._done = threading.Event()

    def _sample(self) -> None:
        me = os.getpid()
        while not self._done.is_set():
            self.peak = max(self.peak, rss_bytes([me, *descendants(me)]))
            self._done.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def config(sites: int, rounds: int, slides: int, size: int, store: Path):
    return parse_sim_config({
        "classes": ["adenoma", "adenocarcinoma"], "positive_class": "adenocarcinoma",
        "federation": {"rounds": rounds, "min_sites": 2, "round_timeout": 600},
        "training": {"epochs": 1, "batch_size": 2, "learning_rate": 0.003},
        "simulation": {"sites": sites, "seed": 0, "data": {"generated": {"slides": slides, "size": size}},
                       "test_fraction": 0.2, "val_fraction": 0.2,
                       "tiling": {"target_mpp": 1.0, "tile_size": 96, "min_tissue": 0.4, "mask_size": 256},
                       "features": {"batch_size": 32, "num_workers": 0, "cache_dir": str(store)},
                       "backend": {"cpus_per_site": 1}}}, "sim_scale")


def run(quick: bool) -> dict:
    # Quick is one small run: a simulation's start-up (SuperLink, Ray, a worker per core importing
    # torch and Opacus) alone takes most of a minute here.
    site_counts, rounds, slides, size = ((3,), 2, 12, 512) if quick else ((5, 10, 20), 10, 60, 768)
    logging.getLogger("fedpath.site").setLevel(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        for sites in site_counts:
            cfg = config(sites, rounds, slides, size, store)
            layout = materialise(cfg, Path(tmp) / f"sites-{sites}", progress=False)  # cached once, not timed
            start = time.perf_counter()
            with PeakMemory() as memory:
                folder = run_simulation(cfg, layout, Path(tmp) / f"sites-{sites}")
            seconds = time.perf_counter() - start
            timing = [entry["timing"]["round_s"] for entry in json.loads((folder / "metrics.json").read_text())]
            rows.append({"sites": sites, "seconds": round(seconds, 1),
                         "round_seconds": round(statistics.mean(timing[1:] or timing), 2),
                         "first_round_seconds": round(timing[0], 1),
                         "peak_rss_gb": round(memory.peak / 1e9, 2)})
            print(json.dumps(rows[-1]), flush=True)
    return {"rounds": rounds, "slides": slides, "slide_px": size, "partition": "iid", "dp": True,
            "cpus_per_site": 1, "cores": os.cpu_count(),
            "sites": [r["sites"] for r in rows], "seconds": [r["seconds"] for r in rows],
            "peak_rss_gb": [r["peak_rss_gb"] for r in rows], "rows": rows}
