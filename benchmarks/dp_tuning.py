"""DP hyper-parameters at a fixed ε, each varied alone around fedpath's defaults, for small hospitals.

``dp_levers`` measures the levers that became the defaults; this measures the ones the defaults kept:
the clipping bound (sites' ``privacy.max_grad_norm``), the recurrent core's hidden size (fewer private
weights), and local epochs against rounds at the same 20 local epochs in all. Same federation as
``dp_levers_small`` (300 items per class, 5 sites, Dirichlet α = 0.5, ε = 3, 3 seeds), where DP noise
weighs most; ``defaults`` is run again in the same run, so every arm is compared on the same test items.
"""

from __future__ import annotations

from benchmarks.dp_levers import run as levers
from benchmarks.dp_levers_small import PER_CLASS
from benchmarks.fed_vs_central import DEFAULTS

ARMS = {
    "defaults": DEFAULTS,
    "clip_0.5": {**DEFAULTS, "privacy": {"max_grad_norm": 0.5}},
    "clip_2": {**DEFAULTS, "privacy": {"max_grad_norm": 2.0}},
    "hidden_32": {**DEFAULTS, "model": {**DEFAULTS["model"], "hidden": 32}},
    "rounds_20_epochs_1": {**DEFAULTS, "schedule": {"rounds": 20, "epochs": 1}},
    "rounds_5_epochs_4": {**DEFAULTS, "schedule": {"rounds": 5, "epochs": 4}},
}
"""Each arm: the defaults with one setting changed (the defaults: clip 1.0, hidden 128, 10 rounds x 2 epochs)."""


def run(quick: bool) -> dict:
    return levers(quick, None if quick else PER_CLASS, ARMS)
