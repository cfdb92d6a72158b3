"""``fed_vs_central`` on the honest trunk: pretrained only on healthy mucosa and serrated lesions (H, S).

The trunk of ``fed_vs_central`` was pretrained on tiles of the evaluated classes (other tiles than
the evaluation part, but the same classes from the same collection), which flatters every arm. This
one has seen no tile of adenocarcinoma or adenoma (``benchmarks/_crc_trunk.py``, ``UNSEEN``): the
figure to expect from a trunk pretrained on public data of other tissue. Same evaluation tiles,
same split, same settings.
"""

from __future__ import annotations

from benchmarks._crc_trunk import QUICK, UNSEEN
from benchmarks.fed_vs_central import run as compare


def run(quick: bool) -> dict:
    return compare(quick, QUICK if quick else UNSEEN)
