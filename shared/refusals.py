"""Why a site refuses: numeric codes, the only form in which a refusal leaves a site.

Kept apart from the round plan (which needs torch for the model config) because the ClientApp's
outermost mod maps every failure to one of these codes, in processes that import only Flower.
"""

from __future__ import annotations

import re

REFUSALS = {
    0: None,
    1: "privacy budget exhausted: this round would spend more than the site allows",
    2: "privacy plan changed: the site's ledger was planned for other rounds, epochs or batch size",
    3: "differential privacy is off at this site but the federation requires it",
    4: "the site's classes differ from the federation's",
    5: "the site has no prepared training data for the federation's model (run `fedpath-site prepare`)",
    6: "the site's update failed its own checks before leaving (non-finite, norm bound, or secure aggregation range)",
    7: "the site's trunk weights are not the ones the federation pinned (model.trunk_sha256)",
    8: "the site requires secure aggregation but the server sent a plain training message",
    9: "the SecAgg+ round is unsafe for this site (threshold below a strict majority, fewer sites than its minimum, "
       "also fewer that trained, paired with only some sites, keys, list of sites or survivors not signed by the "
       "consortium's members or by a survivor given another plan or model, or inconsistent unmask lists)",
    10: "the server's federation_id is not a valid name (letters, digits, '.', '_', '-'; at most 64)",
    11: "the site's lifetime privacy budget (over all federations on its data) would be exceeded",
    12: "the submitted app bundle is not on this site's allow-list: the site runs only its approved fedpath version",
    13: "the site could not handle the message (details in the site's own log)",
    14: "the reply did not pass the site's egress policy (fields outside its `disclose:` list)",
    15: "the server asked for reproducible (replayable) DP noise, which only a simulation may use",
    16: "the site sits this SecAgg+ round out; it does not disclose why (`refused` is not in its `disclose:` list)",
    17: "the site offered its evaluation counts at this SecAgg+ round's setup but cannot release them now "
        "(its validation slides or privacy.release_evaluation changed during the round)",
    18: "the site's privacy ledger for this federation is behind its egress log (deleted, restored from an older "
        "copy, or replaced while the round ran): refused, or the reply withheld, until the latest copy is restored",
}
"""Why a site sat a round out or refused a message. In a plain training reply the code travels as the
numeric metric ``refused``; a message the site refuses outright, and a SecAgg+ round it sits out, are
answered with a Flower error whose code is ``REFUSAL_ERROR_BASE + code`` and whose reason is empty (no
text leaves a site)."""

BUDGET_REFUSAL = 1
"""The site's budget for this federation has no room for the round (e.g. a round redone after a crash)."""
UNSAFE_ROUND_REFUSAL = 9
"""A SecAgg+ stage the site refuses (``client/secure_round.py``)."""
UNDISCLOSED_SIT_OUT = 16
"""A site that sits a SecAgg+ round out answers with an error code instead of a masked vector; when it
does not disclose ``refused``, with this one rather than its reason."""

REFUSAL_ERROR_BASE = 1000
"""Flower error codes at or above this are fedpath refusal codes (``code - REFUSAL_ERROR_BASE``)."""

FEDERATION_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
"""What a federation id may look like (the whole string: ``fullmatch``, so not even a trailing newline):
it names the site's ledger file, so it can never be a path."""


class InvalidFederationId(ValueError):
    """The server's federation id cannot name a file at the site (it is checked before anything else)."""


def federation_id_problem(value: object) -> str | None:
    """None when ``value`` is a valid federation id, otherwise what is wrong with it (any type)."""
    if isinstance(value, str) and FEDERATION_ID.fullmatch(value):
        return None
    return "must be 1-64 letters, digits, '.', '_' or '-', not starting with '.'"


def refusal_code(error_code: int) -> int | None:
    """The fedpath refusal code of a Flower error code, or None for Flower's own errors."""
    return error_code - REFUSAL_ERROR_BASE if error_code >= REFUSAL_ERROR_BASE else None


def strict_majority(sites: int) -> int:
    """The smallest reconstruction threshold sites accept and the server uses by default: no two
    disjoint groups of this size exist among ``sites``."""
    return sites // 2 + 1


def refusal_text(code: int) -> str:
    """What a refusal code means, for logs and reports (an unknown code is shown as a number)."""
    return REFUSALS.get(code) or f"refusal code {code}"
