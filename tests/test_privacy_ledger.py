"""client.privacy_ledger: exact ε across rounds and restarts, refusals, plan, file safety."""

import json
import os

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.privacy_ledger import BudgetExceeded, LedgerError, PrivacyBudget, PrivacyLedger

DELTA = 1e-5
Q, STEPS = 1 / 13, 13  # 200 sequences, batch 16: Opacus' sample rate is 1 / len(loader)
ACCOUNTANT = {"rdp": RDPAccountant, "prv": PRVAccountant}
ROUNDS = {"rdp": 20, "prv": 6}  # PRV is ~5x slower per ε: fewer rounds keep the file under 60 s


def _single_accountant_epsilon(kind: str, steps: list[tuple[float, float, int]]) -> float:
    """ε of one accountant that saw every optimizer step of the federation."""
    accountant = ACCOUNTANT[kind]()
    for sigma, rate, count in steps:
        for _ in range(count):
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return accountant.get_epsilon(delta=DELTA)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_across_restarts_equals_one_accountant(tmp_path, kind):
    budget = PrivacyBudget(50.0, DELTA, kind)
    path = tmp_path / "ledger.json"
    for rnd in range(ROUNDS[kind]):
        ledger = PrivacyLedger(path, budget)  # a fresh process every round
        assert len(ledger.history) == rnd
        epsilon = ledger.record_round(1.0, Q, STEPS, round_id=rnd)
    reference = _single_accountant_epsilon(kind, ledger.history)
    assert epsilon == reference
    assert PrivacyLedger(path, budget).epsilon_spent() == reference
    # The trap the ledger avoids: a new engine per round reports one round's ε.
    assert reference > 1.5 * _single_accountant_epsilon(kind, [(1.0, Q, STEPS)])


def test_mixed_settings_match_one_accountant(tmp_path):
    budget = PrivacyBudget(50.0, DELTA)
    rounds = [(1.0, Q, STEPS), (1.0, Q, STEPS), (1.3, 0.05, 20), (1.0, Q, 5)]
    for rnd, segment in enumerate(rounds):
        PrivacyLedger(tmp_path / "ledger.json", budget).record_round(*segment, round_id=rnd)
    ledger = PrivacyLedger(tmp_path / "ledger.json", budget)
    assert ledger.history == rounds
    assert ledger.epsilon_spent() == pytest.approx(_single_accountant_epsilon("rdp", rounds), rel=1e-12)


def test_alternating_training_and_evaluation_cost_no_more_each_round(tmp_path):
    """A round records training and then an evaluation release with other settings, so the history does
    not merge; ε must still be Opacus' own, and a round must not recompute the orders of earlier ones."""
    from client.privacy_ledger import _rdp_per_step

    budget = PrivacyBudget(1000.0, DELTA)
    ledger = PrivacyLedger(tmp_path / "ledger.json", budget)
    ledger.record_round(1.1, Q, STEPS, round_id="round-1")
    ledger.record_round(3.0, 1.0, 1, round_id="round-1-evaluation")
    computed = _rdp_per_step.cache_info().misses
    for rnd in range(2, 31):
        ledger.record_round(1.1, Q, STEPS, round_id=f"round-{rnd}")
        epsilon = ledger.record_round(3.0, 1.0, 1, round_id=f"round-{rnd}-evaluation")
    assert _rdp_per_step.cache_info().misses == computed  # the same two settings: nothing computed again
    assert len(ledger.history) == 60
    reference = RDPAccountant()
    reference.history = list(ledger.history)
    assert epsilon == reference.get_epsilon(delta=DELTA)  # bit for bit


@pytest.mark.parametrize("kind, rounds", [("rdp", 20), ("prv", 4)])
def test_the_plan_spends_the_budget_over_the_planned_rounds(tmp_path, kind, rounds):
    budget = PrivacyBudget(8.0, DELTA, kind)
    path = tmp_path / "ledger.json"
    sigma = PrivacyLedger(path, budget).plan(Q, STEPS, rounds).noise_multiplier
    ledger = PrivacyLedger(path, budget)
    assert ledger.plan(Q, STEPS, rounds).noise_multiplier == sigma  # stored, not searched again
    for rnd in range(rounds):
        ledger.check_segments([(sigma, Q, STEPS)], round_id=rnd)
        epsilon = ledger.record_round(sigma, Q, STEPS, round_id=rnd)
    assert epsilon <= budget.epsilon
    assert epsilon == pytest.approx(budget.epsilon, rel=0.01)
    with pytest.raises(BudgetExceeded):
        ledger.check_segments([(sigma, Q, STEPS)])
    with pytest.raises(LedgerError, match=r"holds the noise plan .* this round asks for"):
        PrivacyLedger(path, budget).plan(Q, STEPS, rounds + 5)


def test_plan_after_unplanned_rounds_is_refused(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", PrivacyBudget(8.0, DELTA))
    ledger.record_round(1.0, Q, STEPS, round_id=1)
    with pytest.raises(LedgerError, match="made without a noise plan"):
        ledger.plan(Q, STEPS, 10)


def test_round_beyond_the_budget_is_refused_and_not_recorded(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, PrivacyBudget(3.5, DELTA))
    spent = ledger.record_round(1.0, Q, STEPS, round_id=1)
    with pytest.raises(BudgetExceeded) as before:
        ledger.check_segments([(1.0, Q, STEPS)])
    would = before.value.would_spend  # as one accountant that saw both rounds' steps counts it:
    assert spent < 3.5 < would == pytest.approx(_single_accountant_epsilon("rdp", [(1.0, Q, STEPS)] * 2), rel=1e-6)
    message = str(before.value)
    assert f"spent so far {spent:.4f}" in message and f"would be {would:.4f}" in message
    assert "budget ε=3.5" in message and str(path) in message and "Do not train" in message
    assert isinstance(before.value, RuntimeError) and before.value.would_spend == would
    file_before = path.read_text()
    with pytest.raises(BudgetExceeded, match="NOT recorded: discard its model update"):
        ledger.record_round(1.0, Q, STEPS, round_id=2)
    assert path.read_text() == file_before and len(ledger.history) == 1


def test_duplicate_round_id_is_refused(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, PrivacyBudget(50.0, DELTA))
    ledger.record_round(1.0, Q, STEPS, round_id=3)
    file_before = path.read_text()
    for again in (3, "3"):
        with pytest.raises(LedgerError, match=r"round .*3.* is already recorded in .*ledger.json.*retry1"):
            PrivacyLedger(path, ledger.budget).record_round(1.0, Q, STEPS, round_id=again)
    with pytest.raises(LedgerError, match="already recorded"):
        ledger.check_segments([(1.0, Q, STEPS)], round_id=3)
    assert path.read_text() == file_before
    assert ledger.record_round(1.0, Q, STEPS, round_id="3-retry1") > 0


def test_a_round_that_died_after_its_evaluation_release_is_retried_under_its_own_id(tmp_path):
    """A round records its evaluation release before its training; a crash between the two must not make
    the retry reuse the id, whose evaluation release is taken (that refused every retry: refusal 2)."""
    ledger = PrivacyLedger(tmp_path / "ledger.json", PrivacyBudget(50.0, DELTA))
    ledger.record_round(3.0, 1.0, 1, round_id="round-1-evaluation")  # then the site died
    again = PrivacyLedger(tmp_path / "ledger.json", ledger.budget)
    assert again.unused_round_id("round-1") == "round-1-retry1"
    again.record_round(3.0, 1.0, 1, round_id="round-1-retry1-evaluation")
    again.record_round(1.0, Q, STEPS, round_id="round-1-retry1")
    assert again.unused_round_id("round-1") == "round-1-retry2"
    assert again.unused_round_id("round-2") == "round-2"


def test_file_is_valid_json_after_every_record_and_no_temporaries_remain(tmp_path):
    path = tmp_path / "sub" / "ledger.json"
    ledger = PrivacyLedger(path, PrivacyBudget(50.0, DELTA))
    for rnd in range(3):
        epsilon = ledger.record_round(1.0, Q, STEPS, round_id=rnd)
        document = json.loads(path.read_text())
        assert len(document["rounds"]) == rnd + 1
        entry = document["rounds"][-1]
        assert entry["epsilon_after"] == epsilon and entry["steps"] == STEPS and entry["round_id"] == rnd
        assert entry["noise_multiplier"] == 1.0 and entry["sample_rate"] == Q and entry["recorded_at"]
        assert document["budget"] == {"epsilon": 50.0, "delta": DELTA, "accountant": "rdp"}
    assert os.listdir(path.parent) == ["ledger.json"]


def test_failed_write_keeps_the_old_file_and_state(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, PrivacyBudget(50.0, DELTA))
    ledger.record_round(1.0, Q, STEPS, round_id=1)
    file_before = path.read_text()

    def crash(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        ledger.record_round(1.0, Q, STEPS, round_id=2)
    assert path.read_text() == file_before and len(ledger.history) == 1
    assert os.listdir(tmp_path) == ["ledger.json"]


def test_second_writer_is_refused(tmp_path):
    budget = PrivacyBudget(50.0, DELTA)
    first, second = PrivacyLedger(tmp_path / "ledger.json", budget), PrivacyLedger(tmp_path / "ledger.json", budget)
    first.record_round(1.0, Q, STEPS, round_id=1)
    with pytest.raises(LedgerError, match="changed on disk since this ledger read it"):
        second.record_round(1.0, Q, STEPS, round_id=2)
    assert len(PrivacyLedger(tmp_path / "ledger.json", budget).history) == 1


@pytest.mark.parametrize(
    "content, reason",
    [
        ("{not json", "cannot be read as JSON"),
        ('{"rounds": []}', "is not a fedpath-privacy-ledger/1 file"),
        ('{"format": "fedpath-privacy-ledger/1", "rounds": []}', "budget is missing or invalid"),
        (
            '{"format": "fedpath-privacy-ledger/1", "budget": {"epsilon": 8, "delta": 1e-5, "accountant": "rdp"}, '
            '"plan": null, "rounds": [{"round_id": 1, "noise_multiplier": -1, "sample_rate": 0.1, "steps": 3}]}',
            "plan or rounds are malformed",
        ),
    ],
)
def test_corrupt_file_is_a_clear_error_naming_it(tmp_path, content, reason):
    path = tmp_path / "ledger.json"
    path.write_text(content)
    with pytest.raises(LedgerError, match=reason) as error:
        PrivacyLedger(path, PrivacyBudget(8.0, DELTA))
    assert str(path) in str(error.value) and "do not delete it" in str(error.value)


@pytest.mark.parametrize(
    "other", [PrivacyBudget(8.0, 1e-6), PrivacyBudget(8.0, DELTA, "prv"), PrivacyBudget(4.0, DELTA)]
)
def test_ledger_for_another_budget_is_refused(tmp_path, other):
    path = tmp_path / "ledger.json"
    PrivacyLedger(path, PrivacyBudget(8.0, DELTA)).record_round(1.0, Q, STEPS, round_id=1)
    with pytest.raises(LedgerError, match="was written for the budget .* but this site is configured with") as error:
        PrivacyLedger(path, other)
    assert str(path) in str(error.value)


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="accountant must be one of"):
        PrivacyBudget(8.0, DELTA, "gdp")
    with pytest.raises(ValueError, match="delta must be in"):
        PrivacyBudget(8.0, 0.0)
    ledger = PrivacyLedger(tmp_path / "ledger.json", PrivacyBudget(8.0, DELTA))
    with pytest.raises(ValueError, match="σ = 0 means no privacy"):
        ledger.check_segments([(0.0, Q, STEPS)])
    with pytest.raises(ValueError, match="1 / len"):
        ledger.check_segments([(1.0, 16, STEPS)])
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        ledger.record_round(1.0, Q, 2.5, round_id=1)
    assert not (tmp_path / "ledger.json").exists()


def _train_one_round(engine: PrivacyEngine, sigma: float, loader: DataLoader) -> None:
    model = nn.Linear(4, 2)
    model, optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        poisson_sampling=True,
    )
    for features, labels in private_loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(features), labels).backward()
        optimizer.step()


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook")
def test_training_with_an_attached_engine_records_its_steps(tmp_path):
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(200, 4), torch.randint(0, 2, (200,))), batch_size=16)
    path, budget = tmp_path / "ledger.json", PrivacyBudget(8.0, DELTA)
    sample_rate = 1 / len(loader)
    for rnd in range(3):
        ledger = PrivacyLedger(path, budget)
        sigma = ledger.plan(sample_rate, len(loader), planned_rounds=10).noise_multiplier
        ledger.check_segments([(sigma, sample_rate, len(loader))], round_id=rnd)
        engine = PrivacyEngine(accountant="rdp")
        ledger.attach(engine)
        _train_one_round(engine, sigma, loader)
        epsilon = ledger.record_from_engine(engine, rnd)
        assert engine.get_epsilon(DELTA) == epsilon  # the engine reports the federation's total
    assert ledger.history == [(sigma, sample_rate, len(loader))] * 3
    assert epsilon == _single_accountant_epsilon("rdp", ledger.history)
    with pytest.raises(LedgerError, match="no steps"):
        ledger.record_from_engine(engine, "again")


@pytest.mark.filterwarnings("ignore:Secure RNG turned off")
def test_engine_misuse_is_refused(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", PrivacyBudget(8.0, DELTA))
    with pytest.raises(LedgerError, match=r"PrivacyEngine\(accountant='rdp'\)"):
        ledger.attach(PrivacyEngine(accountant="prv"))
    with pytest.raises(LedgerError, match="not attached"):
        ledger.record_from_engine(PrivacyEngine(accountant="rdp"), 1)
    used = PrivacyEngine(accountant="rdp")
    used.accountant.step(noise_multiplier=1.0, sample_rate=Q)
    with pytest.raises(LedgerError, match="already holds steps"):
        ledger.attach(used)


def test_the_settings_a_plan_was_made_under_are_pinned_whatever_the_derived_rate(tmp_path):
    """Two sites of 40 and 41 patients at batch 16 plan the same derived rate and steps (3 batches); a server that
    moves the batch size to 20 changes 41's plan (3 batches) as little as 40's (2): each is refused the same way,
    so the refusal says nothing of either count."""
    budget = PrivacyBudget(8.0, DELTA)
    for patients, path in ((40, tmp_path / "a.json"), (41, tmp_path / "b.json")):
        batches = -(-patients // 16)
        PrivacyLedger(path, budget).plan(1 / batches, batches, 4, settings={"batch_size": 16, "epochs": 1})
        moved = -(-patients // 20)
        with pytest.raises(LedgerError, match=r"changed batch_size \(planned with \{'batch_size': 16\}"):
            PrivacyLedger(path, budget).plan(1 / moved, moved, 4, settings={"batch_size": 20, "epochs": 1})
        assert PrivacyLedger(path, budget).plan(1 / batches, batches, 4, settings={"batch_size": 16, "epochs": 1})
    # a ledger planned before settings were pinned: its next matching round pins them, and from then on a changed
    # setting is refused whatever the derived values say
    old = tmp_path / "old.json"
    PrivacyLedger(old, budget).plan(Q, STEPS, 4)
    assert "settings" not in json.loads(old.read_text())["plan"]
    with pytest.raises(LedgerError, match="holds the noise plan"):  # a derived change: refused, nothing pinned
        PrivacyLedger(old, budget).plan(Q, STEPS + 1, 4, settings={"batch_size": 16})
    assert "settings" not in json.loads(old.read_text())["plan"]
    assert PrivacyLedger(old, budget).plan(Q, STEPS, 4, settings={"batch_size": 16})
    assert json.loads(old.read_text())["plan"]["settings"] == {"batch_size": 16}
    with pytest.raises(LedgerError, match=r"changed batch_size"):
        PrivacyLedger(old, budget).plan(Q, STEPS, 4, settings={"batch_size": 20})
