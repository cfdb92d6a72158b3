"""A round's numbers as the server knows them: the federation's, from the masked sum, and per site
only what each hospital discloses.

Sites send their evaluation as noisy counts inside the masked vector (``shared/round_sums.py``),
so the federation's accuracy, sensitivity and specificity are exact for the summed counts and its
AUC is exact to a histogram bin; the noise each site adds is what makes evaluation a private
release. Per site the server sees the disclosed numbers (by default ε spent and the refusal code)
and whether the site answered; everything else stays at the site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.run_config import DISCLOSABLE

SITE_KEYS = tuple(key for key in DISCLOSABLE if key != "refused")
"""Per-site numbers a hospital may disclose, besides its refusal code (``SiteRound.refused``)."""


@dataclass
class SiteRound:
    """What one site disclosed in a round, and what the server saw of it."""

    answered: bool = False  # its training reply arrived (and was usable)
    refused: int = 0  # the refusal code it disclosed, or the one its error reply carried
    rejected: str | None = None  # why the server set its reply aside (plain mode only: replies are visible)
    disclosed: dict[str, float] | None = None  # the numbers of its reply's `disclose:` list

    @property
    def trained(self) -> bool:
        """Took part with an update, as far as the server can tell (a refusal it did not disclose looks
        like taking part: the masked sum then carries zeros for it)."""
        return self.answered and not self.refused and self.rejected is None

    def value(self, key: str) -> float:
        value = (self.disclosed or {}).get(key)
        return math.nan if value is None else float(value)

    def as_entry(self) -> dict[str, float]:
        return {**{key: self.value(key) for key in SITE_KEYS if key in (self.disclosed or {})},
                "refused": self.refused, "trained": self.trained}
