"""What the server asks of every site in a round.

The server sends one ``RoundPlan`` as JSON inside the Flower instruction (server -> site, so
strings are fine there). Sites answer with numbers only (``shared/round_sums.py``), and refuse
with numeric codes (``shared/refusals.py``), never paths, patient ids or pixels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from shared.model_config import ModelConfig
from shared.refusals import InvalidFederationId, federation_id_problem
from shared.server_labels import server_label
from shared.yaml_config import at_least, between, check, parse_config, positive

PLAN_KEY = "fedpath-plan"

# What a server may ask of a site, bounded: the machine is the hospital's, its task runner serves one
# message at a time, and a plan of 10^12 epochs or a 2^40-bin histogram would hold it or fail only
# after allocating. server.yaml is checked against the same bounds, so an honest server never meets them.
EPOCHS = between(1, 1_000)
PROXIMAL_MU = between(0, 1_000_000)
BATCH_SIZE = between(1, 1_000_000)
SEQUENCE_LENGTH = between(1, 100_000)
ROUNDS = between(1, 100_000)  # server.yaml: rounds up to 100,000 - 1,000, plus spare_rounds up to 1,000
EVALUATIONS = between(0, 1_000_000)
WEIGHT_SCALE = between(1, 1_000_000_000)


def evaluation_bins_rule(bins: int) -> str | None:
    return None if 2 <= bins <= 1_000 and bins % 2 == 0 else "must be an even number from 2 to 1,000"


def clipping_range_rule(value: float | None) -> str | None:
    return positive(value) if value is not None else None


@dataclass(frozen=True)
class PrivacyTarget:
    """The consortium's plan; each site caps ε and δ with its own budget from site.yaml."""

    required: bool = True  # a site with privacy.enabled: false refuses to train
    epsilon: float = check(positive, 8.0)
    delta: float = check(lambda d: None if 0 < d < 1 else "must be between 0 and 1 (exclusive)", 1e-5)
    # The part of ε that the run's evaluation releases spend together (noisy counts of the received model's
    # predictions on each site's validation patients); the rest goes to DP-SGD.
    evaluation_share: float = check(lambda s: None if 0 < s < 1 else "must be between 0 and 1 (exclusive)", 0.25)


@dataclass(frozen=True)
class RoundPlan:
    federation_id: str = check(federation_id_problem)  # the run folder's name: names the site's ledger file
    round: int = check(at_least(1), 1)
    planned_rounds: int = check(ROUNDS, 1)  # rounds the privacy budget must last
    classes: tuple[str, ...] = ()
    positive_class: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    sequence_length: int = check(SEQUENCE_LENGTH, 8)
    epochs: int = check(EPOCHS, 1)
    batch_size: int = check(BATCH_SIZE, 16)
    learning_rate: float = check(positive, 1e-3)
    proximal_mu: float = check(PROXIMAL_MU, 0.0)  # FedProx; 0 is plain FedAvg local training
    seed: int = 0
    privacy: PrivacyTarget = field(default_factory=PrivacyTarget)
    max_update_norm: float = check(positive, 10.0)  # L2 bound of the update a site may send
    secagg_clipping_range: float | None = check(clipping_range_rule, None)  # SecAgg+: update values within ± this
    weight_scale: int = check(WEIGHT_SCALE, 1000)  # S: reply values are x / S (and every reply's plaintext weight)
    train: bool = True  # False: the run's last exchange, which only evaluates the final model
    evaluate: bool = True  # score the received model on the validation patients before training
    evaluations: int = check(EVALUATIONS, 2)  # evaluation releases the whole run makes (the ledger plans for them)
    evaluation_bins: int = check(evaluation_bins_rule, 10)
    reproducible_noise: bool = False  # simulations only: DP noise seeded from `seed` (deployed sites refuse, code 15)

    def to_config(self) -> dict[str, str]:
        return {PLAN_KEY: json.dumps(asdict(self))}

    @classmethod
    def from_config(cls, config: dict) -> "RoundPlan":
        if PLAN_KEY not in config:
            raise ValueError(f"the server's instruction carries no '{PLAN_KEY}': is the server a fedpath server?")
        document = json.loads(str(config[PLAN_KEY]))
        federation_id = document.get("federation_id") if isinstance(document, dict) else None
        if federation_id_problem(federation_id):
            shown = server_label(federation_id) if isinstance(federation_id, str) else \
                federation_id if federation_id is None or isinstance(federation_id, (bool, int, float)) else \
                type(federation_id).__name__  # never the server's text at length
            raise InvalidFederationId(f"round plan from the server: federation_id {shown!r} "
                                      f"{federation_id_problem(federation_id)}")
        return parse_config(cls, document, "round plan from the server")

