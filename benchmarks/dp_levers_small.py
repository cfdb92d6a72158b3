"""``dp_levers`` for small hospitals: the same arms on 300 items per class instead of 1,200.

With 42 % held out, about 350 training items are dealt to 5 sites with Dirichlet(α = 0.5) skew:
sites of a few to about 130 items, where DP noise weighs far more per step than on the full
evaluation part. The demo's hospitals (about 45 patients each) are in this regime.
"""

from __future__ import annotations

from benchmarks.dp_levers import run as levers

PER_CLASS = 300


def run(quick: bool) -> dict:
    return levers(quick, None if quick else PER_CLASS)
