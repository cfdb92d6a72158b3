"""Run benchmarks by name: ``python -m benchmarks NAME [--quick]`` or ``python -m benchmarks all``."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import pkgutil
import platform
import sys
import time
from pathlib import Path

import torch

from shared.atomic_files import atomic_write_json
from shared.metrics import to_jsonable

RESULTS = Path(__file__).resolve().parent / "results"


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def machine() -> dict:
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__}


RUNNER_FIELDS = ("benchmark", "quick", "total_seconds", "date", "machine")
"""What the runner records about every run (``total_seconds``: the whole benchmark's wall time), beside
the benchmark's own figures, which may not reuse these names (a benchmark's ``seconds`` is its own)."""


def run_one(name: str, quick: bool, device: str | None = None) -> dict:
    """Run one benchmark and save its JSON; ``device`` goes to benchmarks whose ``run`` takes one."""
    module = importlib.import_module(f"benchmarks.{name}")
    takes_device = "device" in inspect.signature(module.run).parameters
    if device is not None and not takes_device:
        raise SystemExit(f"benchmarks/{name}.py has no --device option "
                         "(features, predict, slide_scale and cache_rounds have)")
    start = time.perf_counter()
    result = module.run(quick, device=device) if device is not None else module.run(quick)
    clash = sorted(set(result) & set(RUNNER_FIELDS))
    if clash:
        raise ValueError(f"benchmarks/{name}.py returns {clash}, which the runner records itself: rename them")
    record = to_jsonable({"benchmark": name, "quick": quick,
                          "total_seconds": round(time.perf_counter() - start, 1),
                          "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), **result})
    # Quick runs are smoke tests; they never overwrite the figures of a full run.
    # A GPU run is saved beside the CPU figures, not over them.
    suffix = ("-quick" if quick else "") + (f"-{device.replace(':', '')}" if device not in (None, "cpu") else "")
    atomic_write_json(RESULTS / f"{name}{suffix}.json", record)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("name", choices=available() + ["all"])
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute each")
    parser.add_argument("--device", help="where benchmarks that take one run: cpu (default), auto, cuda, cuda:N, mps")
    args = parser.parse_args(argv)
    names = available() if args.name == "all" else [args.name]
    if args.device is not None and args.name == "all":
        parser.error("--device goes with one benchmark (features, predict, slide_scale or cache_rounds), not all")
    for name in names:
        print(json.dumps(run_one(name, args.quick, args.device)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
