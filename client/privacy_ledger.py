"""One privacy accountant per site for the whole federation, kept on disk.

Every federated round trains with DP-SGD in a fresh process (Flower starts one per
message, and the machine may restart between rounds). A new Opacus ``PrivacyEngine``
per round only knows that round and under-reports the total ε about 3x after 20 rounds.
The ledger is the one accountant of the site: a JSON file with the budget, the noise
plan and every recorded round (σ, sample rate, steps), from which ε is recomputed with
an Opacus accountant exactly as if one accountant had seen every step.

How a round's training code uses it (one process records for a site at a time)::

    ledger = PrivacyLedger(site_dir / "privacy_ledger.json", PrivacyBudget(8.0, 1e-5, "rdp"))
    sample_rate = 1 / len(train_loader)              # Opacus' sample rate, not batch / N
    steps = len(train_loader) * local_epochs
    sigma = ledger.noise_for_plan(sample_rate, steps, planned_rounds)  # same σ every round
    ledger.check_round(sigma, sample_rate, steps, round_id=rnd)        # refuse before training
    engine = PrivacyEngine(accountant=ledger.budget.accountant)
    ledger.attach(engine)                            # engine.get_epsilon() = federation total
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=train_loader,
        noise_multiplier=sigma, max_grad_norm=clip, poisson_sampling=True)
    ...train local_epochs...
    epsilon = ledger.record_from_engine(engine, rnd)  # before the update leaves the site

``record_from_engine`` takes the steps the optimizer really took from the engine's
accountant, so the ledger never trusts a step count computed separately. Do not use
``make_private_with_epsilon``: it plans for one round from zero and ignores the history.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.atomic_files import atomic_write_json
from shared.errors import UserError

if TYPE_CHECKING:  # Opacus takes seconds to import; stages that only read the ledger skip it
    from opacus import PrivacyEngine
    from opacus.accountants import IAccountant

FORMAT = "fedpath-privacy-ledger/1"
ACCOUNTANTS = ("rdp", "prv")
"""Opacus accountants by name (Opacus' own ``mechanism()`` names)."""
BUDGET_SLACK = 1e-6
"""A round may spend up to ε·(1 + BUDGET_SLACK): float noise must not refuse the last planned round."""
PLAN_TOLERANCE = 1e-3
"""The planned rounds spend between ε·(1 - PLAN_TOLERANCE) and ε (binary search on σ)."""

Segment = tuple[float, float, int]
"""(noise_multiplier, sample_rate, steps), the unit of Opacus' accountant history."""


@dataclass(frozen=True)
class PrivacyBudget:
    """The (ε, δ) a site allows for the whole federation, and the accountant that measures it."""

    epsilon: float
    delta: float
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"privacy budget epsilon must be a positive number, got {self.epsilon!r}.")
        if not 0 < self.delta < 1:
            raise ValueError(
                f"privacy budget delta must be in (0, 1), typically below 1/number of slides; got {self.delta!r}."
            )
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy accountant must be one of {sorted(ACCOUNTANTS)}, got {self.accountant!r}.")


class LedgerError(UserError):
    """The ledger file is unreadable or does not fit this site, or the ledger was misused."""


class BudgetExceeded(UserError, RuntimeError):
    """A round would take the site past its privacy budget."""

    def __init__(self, spent: float, would_spend: float, budget: PrivacyBudget, path: Path, advice: str) -> None:
        self.spent, self.would_spend, self.budget = spent, would_spend, budget
        super().__init__(
            f"privacy budget exceeded for {path}: ε spent so far {spent:.4f}, with this round it would be "
            f"{would_spend:.4f}, budget ε={budget.epsilon:g} (δ={budget.delta:g}, {budget.accountant} accountant). "
            f"{advice} To go on, the site's data custodian must approve a larger budget; otherwise this "
            "site stops taking part in training."
        )


class PrivacyLedger:
    """The site's privacy spending across rounds and process restarts, stored in one JSON file.

    Every change is written atomically before the method returns, and a ledger refuses to
    write if the file changed since it read it, so a crash or a second process cannot make
    the site forget privacy it spent.
    """

    def __init__(self, path: Path, budget: PrivacyBudget) -> None:
        self.path = Path(path)
        self.budget = budget
        self._plan: dict[str, Any] | None = None
        self._rounds: list[dict[str, Any]] = []
        self._on_disk: dict[str, Any] | None = None
        self._attached: tuple[IAccountant, list[Segment]] | None = None  # noqa: F821 (TYPE_CHECKING)
        if self.path.exists():
            self._on_disk = self._read()
            self._plan, self._rounds = self._parse(self._on_disk)

    @property
    def history(self) -> list[Segment]:
        """One (noise_multiplier, sample_rate, steps) per recorded round, oldest first."""
        return [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"]) for entry in self._rounds]

    def epsilon_spent(self) -> float:
        """ε spent by all recorded rounds together (at the budget's δ)."""
        return _epsilon(self.budget.accountant, self.budget.delta, _merged(self.history))

    def recorded_epsilon(self) -> float:
        """ε after the last recorded round, as recorded (no accountant needed: cheap to ask)."""
        return float(self._rounds[-1]["epsilon_after"]) if self._rounds else 0.0

    def projected_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε the site would have spent after one more round with these settings."""
        segment = _segment(noise_multiplier, sample_rate, steps)
        return _epsilon(self.budget.accountant, self.budget.delta, _merged([*self.history, segment]))

    def check_round(
        self, noise_multiplier: float, sample_rate: float, steps: int, *, round_id: int | str | None = None
    ) -> None:
        """Raise before training if the round would exceed the budget (BudgetExceeded) or if
        ``round_id`` is already recorded (LedgerError), so no data is touched in vain."""
        if round_id is not None:
            self._refuse_duplicate(round_id)
        projected = self.projected_epsilon(noise_multiplier, sample_rate, steps)
        if projected > self.budget.epsilon * (1 + BUDGET_SLACK):
            raise BudgetExceeded(
                self.epsilon_spent(), projected, self.budget, self.path, "Do not train this round."
            )

    def noise_for_plan(self, sample_rate: float, steps_per_round: int, planned_rounds: int) -> float:
        """The noise multiplier with which ``planned_rounds`` rounds of ``steps_per_round``
        steps at ``sample_rate`` spend the whole budget (within PLAN_TOLERANCE, never above).

        The first call stores the plan in the file; later calls (other rounds, other
        processes) with the same plan return the same σ, so every round adds the same noise.
        A different plan is refused: σ is fixed once rounds have spent privacy under it.
        """
        _segment(1.0, sample_rate, steps_per_round)  # validates the rate and the steps
        if not (isinstance(planned_rounds, int) and planned_rounds >= 1):
            raise ValueError(f"planned_rounds must be a positive integer, got {planned_rounds!r}.")
        plan = {"sample_rate": float(sample_rate), "steps_per_round": steps_per_round, "planned_rounds": planned_rounds}
        if self._plan is not None:
            stored = {key: self._plan[key] for key in plan}
            if stored != plan:
                raise LedgerError(
                    f"{self.path} holds the noise plan {stored} (σ={self._plan['noise_multiplier']:.6g}), "
                    f"but this round asks for {plan}. σ is fixed for the whole federation once planned: "
                    "keep the number of rounds, local epochs, batch size and training set of the plan, "
                    "or start a new federation with a new ledger file."
                )
            return self._plan["noise_multiplier"]
        if self._rounds:
            raise LedgerError(
                f"{self.path} already records {len(self._rounds)} round(s) made without a noise plan; "
                "the plan must be made before the first round. Keep passing the σ those rounds used."
            )
        try:
            with warnings.catch_warnings():  # the search probes extreme σ, where Opacus warns about alpha ranges
                warnings.simplefilter("ignore")
                from opacus.accountants.utils import get_noise_multiplier

                sigma = get_noise_multiplier(
                    target_epsilon=self.budget.epsilon,
                    target_delta=self.budget.delta,
                    sample_rate=sample_rate,
                    steps=planned_rounds * steps_per_round,
                    accountant=self.budget.accountant,
                    epsilon_tolerance=self.budget.epsilon * PLAN_TOLERANCE,
                )
        except ValueError as error:  # Opacus: "The privacy budget is too low."
            raise LedgerError(
                f"no noise multiplier keeps {planned_rounds} rounds x {steps_per_round} steps at sample rate "
                f"{sample_rate:g} within ε={self.budget.epsilon:g}, δ={self.budget.delta:g} ({error}). "
                "Plan fewer rounds or steps, or a larger budget."
            ) from error
        self._commit({**plan, "noise_multiplier": float(sigma)}, self._rounds)
        return float(sigma)

    def record_round(self, noise_multiplier: float, sample_rate: float, steps: int, round_id: int | str) -> float:
        """Add a trained round to the file and return the total ε spent.

        Call it before the round's update leaves the site. Refused, with nothing recorded,
        when ``round_id`` is already in the ledger (LedgerError) or the round exceeds the
        budget (BudgetExceeded: the update must then be discarded, never sent).
        """
        self._refuse_duplicate(round_id)
        segment = _segment(noise_multiplier, sample_rate, steps)
        epsilon = self.projected_epsilon(*segment)
        if epsilon > self.budget.epsilon * (1 + BUDGET_SLACK):
            raise BudgetExceeded(
                self.epsilon_spent(),
                epsilon,
                self.budget,
                self.path,
                "The round was NOT recorded: discard its model update, do not send it.",
            )
        entry = {
            "round_id": round_id,
            "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "noise_multiplier": segment[0],
            "sample_rate": segment[1],
            "steps": segment[2],
            "epsilon_after": epsilon,
        }
        self._commit(self._plan, [*self._rounds, entry])
        return epsilon

    def attach(self, privacy_engine: PrivacyEngine) -> None:
        """Load the ledger's history into a new engine's accountant, before training.

        The engine then reports the federation's total ε (``engine.get_epsilon``), and
        :meth:`record_from_engine` can tell this round's steps from the earlier ones.
        Works before or after ``make_private``, as long as no step was taken yet.
        """
        accountant = privacy_engine.accountant
        if accountant.mechanism() != self.budget.accountant:
            raise LedgerError(
                f"the PrivacyEngine uses the {accountant.mechanism()!r} accountant but {self.path} counts with "
                f"{self.budget.accountant!r}: create it as PrivacyEngine(accountant={self.budget.accountant!r})."
            )
        if accountant.history:
            raise LedgerError(
                "the PrivacyEngine's accountant already holds steps; attach a new engine before training."
            )
        base = _merged(self.history)
        accountant.history = list(base)  # a copy: the accountant extends its list in place
        self._attached = (accountant, base)

    def record_from_engine(self, privacy_engine: PrivacyEngine, round_id: int | str) -> float:
        """Record the steps the attached engine took since :meth:`attach` as round ``round_id``;
        return the total ε spent. Same refusals as :meth:`record_round`."""
        accountant = privacy_engine.accountant
        if self._attached is None or self._attached[0] is not accountant:
            raise LedgerError(
                "this PrivacyEngine is not attached to the ledger: call ledger.attach(engine) before "
                "training, so the ledger can tell this round's steps from earlier rounds'."
            )
        new = _new_segments(self._attached[1], [tuple(entry) for entry in accountant.history])
        if len(new) != 1:
            raise LedgerError(
                f"a round must take at least one step with one noise multiplier and sample rate; the engine "
                f"took {new or 'no steps'} since attach. Train with the planned σ and one data loader, "
                "or use record_round for each setting."
            )
        epsilon = self.record_round(*new[0], round_id)
        self._attached = (accountant, _merged(self.history))
        return epsilon

    def unused_round_id(self, round_id: str) -> str:
        """``round_id``, or ``round_id-retryN`` when a crashed attempt already recorded it:
        a retried round trains again, so it spends privacy again under its own id."""
        recorded = {str(entry["round_id"]) for entry in self._rounds}
        candidate, attempt = round_id, 0
        while candidate in recorded:
            attempt += 1
            candidate = f"{round_id}-retry{attempt}"
        return candidate

    def _refuse_duplicate(self, round_id: int | str) -> None:
        if isinstance(round_id, bool) or not isinstance(round_id, (int, str)):
            raise ValueError(f"round_id must be an int or a str, got {round_id!r}.")
        for entry in self._rounds:
            if str(entry["round_id"]) == str(round_id):
                raise LedgerError(
                    f"round {round_id!r} is already recorded in {self.path} (at {entry['recorded_at']}, "
                    f"ε after it {entry['epsilon_after']:.4f}). Every training run spends privacy, even a retry "
                    f"of a round whose update was lost: record a retry under its own id (e.g. '{round_id}-retry1') "
                    "so it is counted, or skip the round if it was already sent."
                )

    def _commit(self, plan: dict[str, Any] | None, rounds: list[dict[str, Any]]) -> None:
        """Write the new state atomically, then adopt it; refuse if the file changed meanwhile."""
        current = self._read() if self.path.exists() else None
        if current != self._on_disk:
            raise LedgerError(
                f"{self.path} changed on disk since this ledger read it (another process recording for this "
                "site, or the file was replaced or deleted). Nothing was written. Only one process may record "
                "per site at a time; create a new PrivacyLedger from the file and check the round again."
            )
        document = {
            "format": FORMAT,
            "note": "Privacy spent by this site. Never edit or delete: it is the only record of it.",
            "budget": asdict(self.budget),
            "plan": plan,
            "rounds": rounds,
        }
        atomic_write_json(self.path, document)
        self._plan, self._rounds, self._on_disk = plan, rounds, document

    def _read(self) -> dict[str, Any]:
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise self._invalid(f"it cannot be read as JSON ({error})") from error
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise self._invalid(f"it is not a {FORMAT} file")
        return document

    def _parse(self, document: dict[str, Any]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        try:
            stored = PrivacyBudget(**document["budget"])
        except (KeyError, TypeError, ValueError) as error:
            raise self._invalid(f"its budget is missing or invalid ({error})") from error
        if stored != self.budget:
            raise LedgerError(
                f"{self.path} was written for the budget {stored} but this site is configured with {self.budget}. "
                "The ε already spent was measured against the stored budget: configure the stored values again, "
                "or start a new federation with a new ledger file (never delete this one)."
            )
        plan, rounds = document.get("plan"), document.get("rounds")
        if not isinstance(rounds, list):
            raise self._invalid("it has no list of rounds")
        try:
            if plan is not None:
                _segment(plan["noise_multiplier"], plan["sample_rate"], plan["steps_per_round"])
                if not isinstance(plan["planned_rounds"], int):
                    raise ValueError("planned_rounds is not an integer")
            for entry in rounds:
                _segment(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
                if isinstance(entry["round_id"], bool) or not isinstance(entry["round_id"], (int, str)):
                    raise ValueError(f"round_id {entry['round_id']!r} is not an int or a str")
                if missing := {"recorded_at", "epsilon_after"} - entry.keys():
                    raise KeyError(", ".join(sorted(missing)))
        except (KeyError, TypeError, ValueError) as error:
            raise self._invalid(f"its plan or rounds are malformed ({type(error).__name__}: {error})") from error
        return plan, rounds

    def _invalid(self, reason: str) -> LedgerError:
        return LedgerError(
            f"{self.path} is not a valid privacy ledger: {reason}. It records the privacy this site already "
            "spent, so do not delete it: restore it from a backup, or ask the federation operator."
        )


def _segment(noise_multiplier: float, sample_rate: float, steps: int) -> Segment:
    """Validated (σ, q, steps) with plain Python types, as JSON and Opacus expect."""
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)) or not (
        math.isfinite(noise_multiplier) and noise_multiplier > 0
    ):
        raise ValueError(
            f"noise_multiplier must be a positive number (σ = 0 means no privacy), got {noise_multiplier!r}."
        )
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1] (Opacus uses 1 / len(data_loader)), got {sample_rate!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    return float(noise_multiplier), float(sample_rate), steps


def _merged(history: list[Segment]) -> list[Segment]:
    """The history as one Opacus accountant stepping through it would hold it: consecutive
    segments with the same σ and q merged. This makes the ledger's ε identical to a single
    accountant's (PRV's numerics depend on the grouping) and keeps accounting fast."""
    merged: list[Segment] = []
    for sigma, rate, steps in history:
        if merged and merged[-1][:2] == (sigma, rate):
            merged[-1] = (sigma, rate, merged[-1][2] + steps)
        else:
            merged.append((sigma, rate, steps))
    return merged


def _new_segments(base: list[Segment], history: list[Segment]) -> list[Segment]:
    """Segments an accountant loaded with ``base`` added since, given its ``history`` now."""
    if not base:
        return history
    last = len(base) - 1
    if (
        len(history) < len(base)
        or history[:last] != base[:last]
        or history[last][:2] != base[last][:2]
        or history[last][2] < base[last][2]
    ):
        raise LedgerError(
            "the PrivacyEngine's accountant no longer starts with the ledger's history (was it reset or loaded "
            "from elsewhere after attach?); this round's steps cannot be told apart. Nothing was recorded."
        )
    extra = history[last][2] - base[last][2]
    return ([(history[last][0], history[last][1], extra)] if extra else []) + history[len(base) :]


@functools.lru_cache(maxsize=256)
def _epsilon_cached(accountant: str, delta: float, history: tuple[Segment, ...]) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    counter = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    counter.history = list(history)
    return float(counter.get_epsilon(delta=delta))


def _epsilon(accountant: str, delta: float, history: list[Segment]) -> float:
    """ε of a merged history; memoised because check, record and restarts ask for the same one."""
    return _epsilon_cached(accountant, delta, tuple(history)) if history else 0.0
