"""What the server asks of every site in a round, and the numeric codes a site answers with.

The server sends one ``RoundPlan`` as JSON inside the Flower instruction (server -> site, so
strings are fine there). Sites answer with numbers only: an update, example counts and the
metrics below, never paths, patient ids or pixels.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from shared.model import ModelConfig
from shared.yaml_config import at_least, check, parse_config, positive

PLAN_KEY = "fedpath-plan"

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
    9: "the round's secure-aggregation settings are unsafe for this site (reconstruction threshold below a strict "
       "majority, fewer sites than the site's minimum, or a site named both active and dropped)",
    10: "the server's federation_id is not a valid name (letters, digits, '.', '_', '-'; at most 64)",
    11: "the site's lifetime privacy budget (over all federations on its data) would be exceeded",
    12: "the submitted app bundle is not on this site's allow-list: the site runs only its approved fedpath version",
    13: "the site could not handle the message (details in the site's own log)",
    14: "the reply did not pass the site's egress policy (fields outside its `disclose:` list)",
}
"""Why a site sat a round out or refused a message. In a training reply the code travels as the
numeric metric ``refused``; a message the site refuses outright is answered with a Flower error
whose code is ``REFUSAL_ERROR_BASE + code`` and whose reason is empty (no text leaves a site)."""

REFUSAL_ERROR_BASE = 1000
"""Flower error codes at or above this are fedpath refusal codes (``code - REFUSAL_ERROR_BASE``)."""

FEDERATION_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
"""What a federation id may look like: it names the site's ledger file, so it can never be a path."""


def federation_id_problem(value: str) -> str | None:
    if isinstance(value, str) and FEDERATION_ID.match(value):
        return None
    return "must be 1-64 letters, digits, '.', '_' or '-', not starting with '.'"


def refusal_text(code: int) -> str:
    """What a refusal code means, for logs and reports (an unknown code is shown as a number)."""
    return REFUSALS.get(code) or f"refusal code {code}"


@dataclass(frozen=True)
class PrivacyTarget:
    """The consortium's plan; each site caps ε and δ with its own budget from site.yaml."""

    required: bool = True  # a site with privacy.enabled: false refuses to train
    epsilon: float = check(positive, 8.0)
    delta: float = check(lambda d: None if 0 < d < 1 else "must be between 0 and 1 (exclusive)", 1e-5)


@dataclass(frozen=True)
class RoundPlan:
    federation_id: str = check(federation_id_problem)  # the run folder's name: names the site's ledger file
    round: int = check(at_least(1), 1)
    planned_rounds: int = check(at_least(1), 1)  # rounds the privacy budget must last
    classes: tuple[str, ...] = ()
    positive_class: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    sequence_length: int = check(at_least(1), 8)
    epochs: int = check(at_least(1), 1)
    batch_size: int = check(at_least(1), 16)
    learning_rate: float = check(positive, 1e-3)
    proximal_mu: float = check(at_least(0), 0.0)  # FedProx; 0 is plain FedAvg local training
    seed: int = 0
    privacy: PrivacyTarget = field(default_factory=PrivacyTarget)
    max_update_norm: float = check(positive, 10.0)  # L2 bound of the update a site may send
    secagg_clipping_range: float | None = None  # SecAgg+ on: every update value must lie within ± this
    secagg_max_weight: int | None = None  # SecAgg+ on: a site with more patients would overflow the weights

    def to_config(self) -> dict[str, str]:
        return {PLAN_KEY: json.dumps(asdict(self))}

    @classmethod
    def from_config(cls, config: dict) -> "RoundPlan":
        if PLAN_KEY not in config:
            raise ValueError(f"the server's instruction carries no '{PLAN_KEY}': is the server a fedpath server?")
        return parse_config(cls, json.loads(str(config[PLAN_KEY])), "round plan from the server")
