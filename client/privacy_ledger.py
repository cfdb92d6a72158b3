"""One privacy accountant per site for the whole federation, kept on disk.

Every federated round trains with DP-SGD in a fresh process (Flower starts one per
message, and the machine may restart between rounds). A new Opacus ``PrivacyEngine``
per round only knows that round and under-reports the total ε about 3x after 20 rounds.
The ledger is the one accountant of the site: a JSON file with the budget, the noise
plan and every recorded round (σ, sample rate, steps), from which ε is recomputed with
an Opacus accountant exactly as if one accountant had seen every step.

How a round's training code uses it (``client/private_training.py``; one process records for
a site at a time)::

    ledger = PrivacyLedger(site_dir / "privacy_ledger.json", PrivacyBudget(8.0, 1e-5, "rdp"))
    loader = DPDataLoader.from_data_loader(train_loader, generator=private)  # Opacus' Poisson loader
    plan = ledger.plan(1 / len(loader), len(loader) * local_epochs, planned_rounds,
                       evaluations=planned_rounds + 1, evaluation_share=0.25)  # same σ every round
    ledger.check_segments([plan.evaluation_segment, plan.training_segment], round_id=rnd)
    noisy = counts + Normal(0, plan.evaluation_noise * sensitivity)     # an evaluation release
    ledger.record_segment(plan.evaluation_segment, f"{rnd}-evaluation", kind="evaluation")
    engine = PrivacyEngine(accountant=ledger.budget.accountant)
    ledger.attach(engine)                            # engine.get_epsilon() = federation total
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=plan.noise_multiplier,
        max_grad_norm=clip, poisson_sampling=False, noise_generator=private)
    ...train local_epochs...
    epsilon = ledger.record_from_engine(engine, rnd)  # before the update leaves the site

The plan is made from the loader Opacus trains with: its accountant records the sample rate
``1 / len(loader)`` of the *wrapped* loader and ``len(loader)`` steps per epoch, which differ from
the plain loader's for some sizes (k batches become k - 1), so planning from anything else would
make the ledger record more than planned and refuse the last round. ``record_from_engine`` takes
the steps the optimizer really took from the engine's accountant, so the ledger never trusts a
step count computed separately. Do not use ``make_private_with_epsilon``: it plans for one round
from zero and ignores the history.

An evaluation release (noisy counts of a model's predictions on the site's validation patients) is
the Gaussian mechanism without sampling: one segment (σ_e, 1.0, 1) in the same accountant, so the
budget covers training and evaluation together and a server cannot query a site's data for free.

A site may also set a lifetime ε over every federation on the same data: all ledgers in the
folder are composed in one accountant (what they recorded plus what their plans still reserve),
and a plan or round that would exceed it is refused (:class:`LifetimeBudgetExceeded`).
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
"""Opacus accountants by name (Opacus' own ``mechanism()`` names, for ``create_accountant``)."""
KINDS = ("training", "evaluation")
"""What a recorded segment was: DP-SGD steps, or one evaluation release (Gaussian mechanism)."""
EVALUATION_SUFFIX = "-evaluation"
"""A round's evaluation release is recorded as ``round-N-evaluation``, before its training ``round-N``."""
BUDGET_SLACK = 1e-6
"""A round may spend up to ε·(1 + BUDGET_SLACK): float noise must not refuse the last planned round."""
PLAN_TOLERANCE = 1e-3
"""The planned rounds spend between ε·(1 - PLAN_TOLERANCE) and ε (binary search on σ)."""
MAX_SIGMA = 1e6
"""Beyond this σ a budget counts as too small to plan for (the bound Opacus' own search uses)."""

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


class LifetimeBudgetExceeded(BudgetExceeded):
    """A plan or round would take the site past its lifetime ε over all federations on its data."""

    def __init__(self, spent: float, would_spend: float, budget: PrivacyBudget, path: Path, lifetime: float,
                 delta: float) -> None:
        self.lifetime = lifetime
        UserError.__init__(
            self,
            f"lifetime privacy budget exceeded: the federations in {path.parent} have spent or reserved "
            f"ε={spent:.4f} together (δ={delta:g}); with {path.name} it would be {would_spend:.4f}, above the "
            f"site's privacy.lifetime_epsilon {lifetime:g}. This federation is refused before any training; the "
            "site's data custodian decides whether the lifetime limit may grow.")
        self.spent, self.would_spend, self.budget = spent, would_spend, budget


@dataclass(frozen=True)
class ReleasePlan:
    """The noise of every release of a federation, fixed before its first round."""

    noise_multiplier: float  # σ of DP-SGD
    sample_rate: float  # Poisson rate Opacus records: 1 / len(the wrapped loader)
    steps_per_round: int
    planned_rounds: int
    evaluations: int = 0  # planned evaluation releases
    evaluation_share: float = 0.0  # of ε, spent by the evaluation releases together
    evaluation_noise: float | None = None  # σ_e: noise std of a release, in units of its L2 sensitivity

    @property
    def training_segment(self) -> Segment:
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)

    @property
    def evaluation_segment(self) -> Segment:
        if self.evaluation_noise is None:
            raise ValueError("this plan has no evaluation releases")
        return (self.evaluation_noise, 1.0, 1)

    def reserved(self, recorded: list[dict[str, Any]]) -> list[Segment]:
        """What the plan still allows after the rounds in ``recorded``."""
        trained = sum(1 for entry in recorded if entry.get("kind", "training") == "training")
        evaluated = sum(1 for entry in recorded if entry.get("kind") == "evaluation")
        out = []
        if self.planned_rounds > trained:
            steps = self.steps_per_round * (self.planned_rounds - trained)
            out.append((self.noise_multiplier, self.sample_rate, steps))
        if self.evaluations > evaluated:
            out.append((self.evaluation_noise, 1.0, self.evaluations - evaluated))
        return out


LEDGERS_DIR = "ledgers"
"""The site's ledgers, one ``<federation_id>.json`` each, in its ``state_dir``."""


def federation_ledger(state_dir: Path | str, federation_id: str) -> Path:
    """The ledger file of a federation (its id is validated before: a plain file name, never a path)."""
    return Path(state_dir) / LEDGERS_DIR / f"{federation_id}.json"


def recorded_releases(path: Path) -> list[tuple[str, str]] | None:
    """Every release the ledger at ``path`` records (training rounds and evaluation releases), oldest
    first, as (round id, time recorded), read without its budget ([]: no file there); None when it is not
    a readable ledger (the ClientApp's own ledger then refuses, code 2). The times tell an entry recorded
    again into an older copy from the original."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            return None
        _, rounds = PrivacyLedger._parse_structure(document)
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return [(str(entry["round_id"]), str(entry["recorded_at"])) for entry in rounds]


def ledger_releases(state_dir: Path) -> dict[str, int]:
    """How many releases each readable ledger in ``state_dir`` records, by federation id."""
    folder = Path(state_dir) / LEDGERS_DIR
    counts = {path.stem: recorded_releases(path) for path in sorted(folder.glob("*.json"))} if folder.is_dir() else {}
    return {federation: len(entries) for federation, entries in counts.items() if entries}


class PrivacyLedger:
    """The site's privacy spending across rounds and process restarts, stored in one JSON file.

    Every change is written atomically before the method returns, and a ledger refuses to
    write if the file changed since it read it, so a crash or a second process cannot make
    the site forget privacy it spent.
    """

    def __init__(self, path: Path, budget: PrivacyBudget, lifetime_epsilon: float | None = None,
                 lifetime_delta: float | None = None) -> None:
        self.path = Path(path)
        self.budget = budget
        self.lifetime_epsilon = lifetime_epsilon
        # one δ for the lifetime total, whichever federation asks (the site's own; federations may use smaller ones)
        self.lifetime_delta = budget.delta if lifetime_delta is None else lifetime_delta
        self._plan: dict[str, Any] | None = None
        self._rounds: list[dict[str, Any]] = []
        self._on_disk: dict[str, Any] | None = None
        self._attached: tuple[IAccountant, list[Segment]] | None = None  # noqa: F821 (TYPE_CHECKING)
        if self.path.exists():
            self._on_disk = self._read()
            self._plan, self._rounds = self._parse(self._on_disk)

    @property
    def history(self) -> list[Segment]:
        """One (noise_multiplier, sample_rate, steps) per recorded round or release, oldest first."""
        return [(entry["noise_multiplier"], entry["sample_rate"], entry["steps"]) for entry in self._rounds]

    @property
    def release_plan(self) -> ReleasePlan | None:
        """The federation's noise plan, once made."""
        return None if self._plan is None else _plan_of(self._plan)

    def epsilon_spent(self) -> float:
        """ε spent by all recorded rounds together (at the budget's δ)."""
        return _epsilon(self.budget.accountant, self.budget.delta, _merged(self.history))

    def recorded_epsilon(self) -> float:
        """ε after the last recorded round, as recorded (no accountant needed: cheap to ask)."""
        return float(self._rounds[-1]["epsilon_after"]) if self._rounds else 0.0

    def check_segments(self, segments: list[Segment], *, round_id: int | str | None = None) -> None:
        """Raise before training if these releases (an evaluation release, a training round) would
        together take the site past its budget (BudgetExceeded) or the lifetime ε, or if ``round_id``
        is already recorded (LedgerError), so no data is touched in vain."""
        if round_id is not None:
            self._refuse_duplicate(round_id)
        segments = [_segment(*segment) for segment in segments]
        projected = self._projected(segments)
        if projected > self.budget.epsilon * (1 + BUDGET_SLACK):
            raise BudgetExceeded(
                self.epsilon_spent(), projected, self.budget, self.path, "Do not train this round."
            )
        self._check_lifetime(self._rounds, segments)

    def plan(self, sample_rate: float, steps_per_round: int, planned_rounds: int, *, evaluations: int = 0,
             evaluation_share: float = 0.0, settings: dict[str, Any] | None = None) -> ReleasePlan:
        """The noise with which ``planned_rounds`` rounds of ``steps_per_round`` DP-SGD steps at
        ``sample_rate`` plus ``evaluations`` evaluation releases spend the whole budget (within
        PLAN_TOLERANCE, never above); the releases together spend ``evaluation_share`` of ε.

        The first call stores the plan in the file; later calls (other rounds, other processes)
        with the same plan return it unchanged, so every round adds the same noise. A different plan
        is refused: σ is fixed once rounds have spent privacy under it. With a lifetime ε, a plan
        whose whole spending would exceed it (with every other federation's) is refused.

        Args:
            settings: what the federation chose that the plan was made under (batch size, epochs,
                the plaintext weight), stored with it and compared first: a change is refused
                whatever the site's data. Compared only through the sample rate and steps, which
                depend on the number of patients, a refusal would tell the server how many there
                are (a batch size b is accepted in place of b0 exactly when ceil(N/b) = ceil(N/b0)).
        """
        _segment(1.0, sample_rate, steps_per_round)  # validates the rate and the steps
        if not (isinstance(planned_rounds, int) and planned_rounds >= 1):
            raise ValueError(f"planned_rounds must be a positive integer, got {planned_rounds!r}.")
        if not (isinstance(evaluations, int) and evaluations >= 0):
            raise ValueError(f"evaluations must be a non-negative integer, got {evaluations!r}.")
        if evaluations and not 0 < evaluation_share < 1:
            raise ValueError(f"evaluation_share must be in (0, 1) when there are evaluation releases, "
                             f"got {evaluation_share!r}.")
        request = {"sample_rate": float(sample_rate), "steps_per_round": steps_per_round,
                   "planned_rounds": planned_rounds, "evaluations": evaluations,
                   "evaluation_share": float(evaluation_share) if evaluations else 0.0}
        settings = None if settings is None else json.loads(json.dumps(settings))  # as the file will hold it
        if self._plan is not None:
            pinned = self._plan.get("settings")
            if settings is not None and pinned is not None and pinned != settings:
                changed = sorted(key for key in {*pinned, *settings} if pinned.get(key) != settings.get(key))
                was = {key: pinned.get(key) for key in changed}
                now = {key: settings.get(key) for key in changed}
                raise LedgerError(
                    f"{self.path}: the federation changed {', '.join(changed)} (planned with {was}, now {now}). "
                    "σ and the plan are fixed for the whole federation once planned; start a new federation.")
            stored = {key: self._plan.get(key, 0 if key == "evaluations" else 0.0) for key in request}
            if settings is not None and pinned is None and stored == request:
                # planned before settings were pinned: pinned from now on (until now a changed batch size that
                # left the rate and steps alone was accepted, and the answer said something about N)
                self._commit({**self._plan, "settings": settings}, self._rounds)
            if stored != request:
                raise LedgerError(
                    f"{self.path} holds the noise plan {stored} (σ={self._plan['noise_multiplier']:.6g}), "
                    f"but this round asks for {request}. σ is fixed for the whole federation once planned: "
                    "keep the number of rounds, local epochs, batch size, evaluations and training set of the "
                    "plan, or start a new federation with a new ledger file."
                )
            return self.release_plan
        if self._rounds:
            raise LedgerError(
                f"{self.path} already records {len(self._rounds)} round(s) made without a noise plan; "
                "the plan must be made before the first round. Keep passing the σ those rounds used."
            )
        evaluation_noise = None
        fixed: list[Segment] = []
        if evaluations:
            evaluation_noise = self._search_sigma(
                [], 1.0, evaluations, self.budget.epsilon * evaluation_share,
                f"{evaluations} evaluation releases within {evaluation_share:g} of ε={self.budget.epsilon:g}")
            fixed = [(evaluation_noise, 1.0, evaluations)]
        sigma = self._search_sigma(fixed, float(sample_rate), planned_rounds * steps_per_round, self.budget.epsilon,
                                   f"{planned_rounds} rounds x {steps_per_round} steps at sample rate "
                                   f"{sample_rate:g}{f' and {evaluations} evaluation releases' if evaluations else ''}")
        plan = ReleasePlan(sigma, float(sample_rate), steps_per_round, planned_rounds, evaluations,
                           request["evaluation_share"], evaluation_noise)
        self._check_lifetime([], plan.reserved([]))
        self._commit({**request, "noise_multiplier": sigma, "evaluation_noise": evaluation_noise,
                      **({"settings": settings} if settings is not None else {})}, self._rounds)
        return plan

    def record_round(self, noise_multiplier: float, sample_rate: float, steps: int, round_id: int | str) -> float:
        """Add a trained round to the file and return the total ε spent.

        Call it before the round's update leaves the site. Refused, with nothing recorded,
        when ``round_id`` is already in the ledger (LedgerError) or the round exceeds the
        budget (BudgetExceeded: the update must then be discarded, never sent).
        """
        return self.record_segment((noise_multiplier, sample_rate, steps), round_id)

    def record_segment(self, segment: Segment, round_id: int | str, kind: str = "training") -> float:
        """:meth:`record_round` for any release: ``kind`` is "training" or "evaluation"."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
        self._refuse_duplicate(round_id)
        segment = _segment(*segment)
        epsilon = self._projected([segment])
        if epsilon > self.budget.epsilon * (1 + BUDGET_SLACK):
            raise BudgetExceeded(
                self.epsilon_spent(),
                epsilon,
                self.budget,
                self.path,
                "The round was NOT recorded: discard its model update, do not send it.",
            )
        self._check_lifetime(self._rounds, [segment])
        entry = {
            "round_id": round_id,
            "kind": kind,
            # microseconds: an entry recorded again into an older copy must not carry the original's time
            "recorded_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            "noise_multiplier": segment[0],
            "sample_rate": segment[1],
            "steps": segment[2],
            "epsilon_after": epsilon,
        }
        self._commit(self._plan, [*self._rounds, entry])
        return epsilon

    def lifetime_spent(self) -> float:
        """ε of every federation in this ledger's folder together: what they recorded plus what their
        plans still reserve (this ledger included), at the lifetime δ."""
        return _epsilon(self.budget.accountant, self.lifetime_delta, self._lifetime_history(self._rounds, []))

    def _projected(self, segments: list[Segment]) -> float:
        return _epsilon(self.budget.accountant, self.budget.delta, _merged([*self.history, *segments]))

    def _search_sigma(self, fixed: list[Segment], sample_rate: float, steps: int, target: float, what: str) -> float:
        """The smallest σ (to PLAN_TOLERANCE) with which (σ, ``sample_rate``, ``steps``) composed with ``fixed``
        spends at most ``target``: Opacus' own bisection, over a composed history."""
        def spent(sigma: float) -> float:
            return _epsilon(self.budget.accountant, self.budget.delta, [*fixed, (sigma, sample_rate, steps)])

        with warnings.catch_warnings():  # the search probes extreme σ, where Opacus warns about alpha ranges
            warnings.simplefilter("ignore")
            low, high = 0.0, 10.0
            while spent(high) > target:
                high *= 2
                if high > MAX_SIGMA:
                    raise LedgerError(
                        f"no noise multiplier keeps {what} within ε={self.budget.epsilon:g}, δ={self.budget.delta:g}. "
                        "Plan fewer rounds or steps, fewer evaluations, or a larger budget.")
            while target - spent(high) > target * PLAN_TOLERANCE:
                middle = (low + high) / 2
                if spent(middle) < target:
                    high = middle
                else:
                    low = middle
        return float(high)

    def _lifetime_history(self, own_rounds: list[dict[str, Any]], extra: list[Segment]) -> list[Segment]:
        """Every federation's recorded segments plus what their plans still reserve; this ledger's from
        ``own_rounds`` + ``extra`` (its plan's remainder counted after them)."""
        history: list[Segment] = []
        for other in sorted(self.path.parent.glob("*.json")):
            if other.resolve() == self.path.resolve():
                continue
            try:
                document = json.loads(other.read_text(encoding="utf-8"))
                if not isinstance(document, dict) or document.get("format") != FORMAT:
                    continue  # not a ledger (the folder is the site's own; nothing else is written there)
                plan, rounds = self._parse_structure(document)
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise LedgerError(f"{other} cannot be read ({error}); the site's lifetime ε cannot be computed "
                                  "without it. Restore it from a backup.") from error
            history += [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in rounds]
            if plan is not None:
                history += _plan_of(plan).reserved(rounds)
        history += [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in own_rounds] + list(extra)
        plan = self.release_plan
        if plan is not None:
            evaluation = plan.evaluation_segment if plan.evaluation_noise is not None else None
            pretend = [*own_rounds, *({"kind": "evaluation" if s == evaluation else "training"} for s in extra)]
            history += plan.reserved(pretend)
        return _merged(history)

    def _check_lifetime(self, own_rounds: list[dict[str, Any]], extra: list[Segment]) -> None:
        if self.lifetime_epsilon is None:
            return
        total = _epsilon(self.budget.accountant, self.lifetime_delta, self._lifetime_history(own_rounds, extra))
        if total > self.lifetime_epsilon * (1 + BUDGET_SLACK):
            before = _epsilon(self.budget.accountant, self.lifetime_delta, self._lifetime_history(self._rounds, []))
            raise LifetimeBudgetExceeded(before, total, self.budget, self.path, self.lifetime_epsilon,
                                         self.lifetime_delta)


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
        """``round_id``, or ``round_id-retryN`` when a crashed attempt already recorded it or its
        evaluation release (``round_id-evaluation``, recorded before the training): a retried round
        trains again, so it spends privacy again under its own id."""
        recorded = {str(entry["round_id"]) for entry in self._rounds}
        candidate, attempt = round_id, 0
        while candidate in recorded or f"{candidate}{EVALUATION_SUFFIX}" in recorded:
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
        try:
            return self._parse_structure(document)
        except (KeyError, TypeError, ValueError) as error:
            raise self._invalid(f"its plan or rounds are malformed ({type(error).__name__}: {error})") from error

    @staticmethod
    def _parse_structure(document: dict[str, Any]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The plan and rounds of a ledger document, validated; raises KeyError/TypeError/ValueError."""
        plan, rounds = document.get("plan"), document.get("rounds")
        if not isinstance(rounds, list):
            raise ValueError("it has no list of rounds")
        if plan is not None:
            _segment(plan["noise_multiplier"], plan["sample_rate"], plan["steps_per_round"])
            if not isinstance(plan["planned_rounds"], int):
                raise ValueError("planned_rounds is not an integer")
            if plan.get("evaluations"):
                _segment(plan["evaluation_noise"], 1.0, plan["evaluations"])
        for entry in rounds:
            _segment(entry["noise_multiplier"], entry["sample_rate"], entry["steps"])
            if isinstance(entry["round_id"], bool) or not isinstance(entry["round_id"], (int, str)):
                raise ValueError(f"round_id {entry['round_id']!r} is not an int or a str")
            if entry.get("kind", "training") not in KINDS:
                raise ValueError(f"kind {entry['kind']!r} is not one of {KINDS}")
            if missing := {"recorded_at", "epsilon_after"} - entry.keys():
                raise KeyError(", ".join(sorted(missing)))
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


def _plan_of(plan: dict[str, Any]) -> ReleasePlan:
    return ReleasePlan(plan["noise_multiplier"], plan["sample_rate"], plan["steps_per_round"], plan["planned_rounds"],
                       plan.get("evaluations", 0), plan.get("evaluation_share", 0.0), plan.get("evaluation_noise"))


def clear_accounting_cache() -> None:
    """Forget every ε and Rényi curve this process computed (a benchmark timing a fresh process)."""
    _epsilon_cached.cache_clear()
    _rdp_per_step.cache_clear()


@functools.lru_cache(maxsize=256)
def _epsilon_cached(accountant: str, delta: float, history: tuple[Segment, ...]) -> float:
    from opacus.accountants import RDPAccountant, create_accountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if accountant == "rdp":  # Opacus' RDPAccountant.get_privacy_spent, with each (σ, q)'s orders computed once
        rdp = sum([_rdp_per_step(sample_rate, sigma) * steps for sigma, sample_rate, steps in history])
        return float(get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)[0])
    counter = create_accountant(mechanism=accountant)
    counter.history = list(history)
    return float(counter.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sample_rate: float, sigma: float):
    """One step's Rényi DP at Opacus' default orders. A round's training and its evaluation release
    alternate, so a federation's history does not merge into few segments: without this, every round
    recomputed every earlier segment's orders (about 0.5 s of CPU each on this machine), and a round's
    accounting grew with the rounds before it (7 s by round 9 of a cache_rounds-like run). RDP composes
    by addition and is linear in the steps, and Opacus computes ``orders * steps`` the same way, so the
    result is bit-identical to its accountant's. Callers never write to the array."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)


def _epsilon(accountant: str, delta: float, history: list[Segment]) -> float:
    """ε of a merged history; memoised because check, record and restarts ask for the same one."""
    return _epsilon_cached(accountant, delta, tuple(history)) if history else 0.0
