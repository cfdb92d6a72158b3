"""Privacy accounting across federated rounds: the site's ledger against one accountant.

Trains ROUNDS rounds x LOCAL_EPOCHS local epoch of DP-SGD (Opacus, Poisson sampling) on
a tiny model over 200 sequences in batches of 16, so Opacus' sample rate is 1/13 and a
round takes 13 steps, with σ from the ledger's plan for ε = 8, δ = 1e-5. Every round
opens the ledger anew from disk, as a fresh Flower process would, and the second half of
the rounds runs in a separate Python process (a restart).

Keys: ``epsilon_ledger`` (the ledger's total), ``epsilon_reference`` (one accountant fed
every step of the federation), ``rel_error`` between them (goal <= 0.01),
``epsilon_naive_per_round_engine`` (what a new PrivacyEngine per round reports: one
round's ε, the trap the ledger avoids), ``accountant``, ``rounds`` and the plan. Quick
mode uses the RDP accountant; the full run adds the same measurement with PRV under
``prv``.

Run: ``python -m benchmarks accounting [--quick]``.
"""

import multiprocessing
import tempfile
import time
import warnings
from pathlib import Path

import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.privacy_ledger import PrivacyBudget, PrivacyLedger

ROUNDS, LOCAL_EPOCHS = 20, 1
SEQUENCES, BATCH_SIZE, FEATURES = 200, 16, 8
TARGET_EPSILON, DELTA = 8.0, 1e-5
ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(SEQUENCES, FEATURES, generator=generator)
    labels = torch.randint(0, 2, (SEQUENCES,), generator=generator)
    return DataLoader(TensorDataset(features, labels), batch_size=BATCH_SIZE)


def _train_rounds(path: Path, budget: PrivacyBudget, rounds: range) -> None:
    """What each round's site process does: plan, check, train under DP, record."""
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook")
    loader = _loader()
    sample_rate, steps = 1 / len(loader), len(loader) * LOCAL_EPOCHS
    for rnd in rounds:
        ledger = PrivacyLedger(path, budget)
        sigma = ledger.noise_for_plan(sample_rate, steps, ROUNDS)
        ledger.check_round(sigma, sample_rate, steps, round_id=rnd)
        engine = PrivacyEngine(accountant=budget.accountant)
        ledger.attach(engine)
        model = nn.Linear(FEATURES, 2)
        model, optimizer, private_loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=1.0,
            poisson_sampling=True,
        )
        for _ in range(LOCAL_EPOCHS):
            for features, labels in private_loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(features), labels).backward()
                optimizer.step()
        ledger.record_from_engine(engine, rnd)


def _measure(accountant: str) -> dict:
    budget = PrivacyBudget(TARGET_EPSILON, DELTA, accountant)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "privacy_ledger.json"
        half = ROUNDS // 2
        _train_rounds(path, budget, range(1, half + 1))
        restarted = multiprocessing.get_context("spawn").Process(
            target=_train_rounds, args=(path, budget, range(half + 1, ROUNDS + 1))
        )
        restarted.start()
        restarted.join()
        if restarted.exitcode != 0:
            raise RuntimeError(
                f"the restarted process for rounds {half + 1}..{ROUNDS} failed (exit code {restarted.exitcode})"
            )
        ledger = PrivacyLedger(path, budget)
        history = ledger.history
        epsilon_ledger = ledger.epsilon_spent()

    reference = ACCOUNTANTS[accountant]()
    for sigma, sample_rate, steps in history:
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=sample_rate)
    naive = ACCOUNTANTS[accountant]()
    naive.history = [history[-1]]
    epsilon_reference = float(reference.get_epsilon(delta=DELTA))
    return {
        "accountant": accountant,
        "rounds": len(history),
        "local_epochs": LOCAL_EPOCHS,
        "restart": f"new ledger from disk every round; rounds {half + 1}..{ROUNDS} in another process",
        "sample_rate": history[0][1],
        "steps_per_round": history[0][2],
        "noise_multiplier": history[0][0],
        "target_epsilon": TARGET_EPSILON,
        "delta": DELTA,
        "epsilon_ledger": epsilon_ledger,
        "epsilon_reference": epsilon_reference,
        "rel_error": abs(epsilon_ledger - epsilon_reference) / epsilon_reference,
        "epsilon_naive_per_round_engine": float(naive.get_epsilon(delta=DELTA)),
        "seconds": round(time.perf_counter() - start, 2),
    }


def run(quick: bool) -> dict:
    """Measure the ledger over ROUNDS rounds with RDP (and PRV unless quick)."""
    result = _measure("rdp")
    if not quick:
        result["prv"] = _measure("prv")
    return result
