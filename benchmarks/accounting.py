"""Privacy accounting across federated rounds: the site's ledger against an independent accountant.

Trains ROUNDS rounds x LOCAL_EPOCHS local epoch through the product's ``train_round``
(Opacus DP-SGD, Poisson sampling) on a small head over 200 patients in batches of 16 (13
batches), with σ from the ledger's plan for ε = 8, δ = 1e-5. Every round opens the ledger
anew from disk, as a fresh Flower process would, and the second half of the rounds runs in a
separate Python process (a restart).

The reference is built from outside the ledger: each round reports the optimizer steps its
loop actually took, the noise multiplier the DP optimizer actually used and the sample rate
of the Poisson loader Opacus actually trained with (1 / its length); a fresh Opacus accountant
is stepped once per counted step with those values. If the ledger planned or recorded
anything else (a plan from the unwrapped loader's 1/k while Opacus samples over k - 1
batches, a missed retry, a lost round after the restart), the two disagree.

Keys: ``epsilon_ledger`` (the ledger's total), ``epsilon_reference`` (the independent
accountant), ``rel_error`` between them (goal <= 0.01, can fail),
``epsilon_naive_per_round_engine`` (what a new PrivacyEngine per round reports: one
round's ε, the trap the ledger avoids), ``accountant``, ``rounds`` and the plan. Quick
mode uses the RDP accountant; the full run adds the same measurement with PRV under
``prv``.

``wrapped_loader_has_fewer_batches``: the same over 93 patients in batches of 1, whose Poisson
loader Opacus wraps into 92 batches (``int(1 / (1/93))``): ``rounds_in_ledger`` 20 means the last
planned round was not refused.

``long_history``: the cost of a round's accounting late in a federation. A ledger whose history
alternates training (σ, q) and an evaluation release (σ', 1), as every round writes it, for
``HISTORY_ROUNDS`` rounds: seconds for the ledger to record the next round (ε checked and written,
from a cold memo, as a new process would), against Opacus' own ``RDPAccountant.get_epsilon`` over the
same history once (the strongest baseline: what the ledger called up to 2026-12-03, three times per
recorded round). Both give the same ε, checked.

Run: ``python -m benchmarks accounting [--quick]``.
"""

import json
import logging
import multiprocessing
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant

from client.privacy_ledger import PrivacyBudget, PrivacyLedger
from client.private_training import train_round
from client.sequence_data import PatientSequences, SlideFeatures
from shared.model import SequenceHead
from shared.run_config import PrivacyConfig, TrainingConfig

ROUNDS, LOCAL_EPOCHS = 20, 1
SEQUENCES, BATCH_SIZE, SEQ_LEN = 200, 16, 4
TARGET_EPSILON, DELTA = 8.0, 1e-5
ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}


def _train_rounds(path: Path, accountant: str, rounds: range, sequences: int = SEQUENCES,
                  batch_size: int = BATCH_SIZE) -> None:
    """What each round's site process does: the product's train_round, which plans, checks,
    trains under DP and records in the ledger at ``path``. What each round really did (steps
    counted by the loop, σ and sample rate read from the optimizer and the loader) is appended to
    ``path``.taken.jsonl, the benchmark's own record."""
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    logging.getLogger("fedpath.site").setLevel(logging.ERROR)
    rng = np.random.default_rng(0)
    slides = [SlideFeatures(f"s{i}", f"p{i}", i % 2, np.abs(rng.standard_normal((8, 32), dtype=np.float32)))
              for i in range(sequences)]
    privacy = PrivacyConfig(epsilon=TARGET_EPSILON, delta=DELTA, accountant=accountant, planned_rounds=ROUNDS)
    training = TrainingConfig(epochs=LOCAL_EPOCHS, batch_size=batch_size)
    head = SequenceHead(2, "rnn", input_dim=32, projection=8, hidden=8)
    for rnd in rounds:
        result = train_round(head, PatientSequences(slides, SEQ_LEN, seed=rnd), training, privacy, path, str(rnd),
                             progress=False)
        with open(f"{path}.taken.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps([result.noise_multiplier, result.sample_rate, result.steps]) + "\n")


def _measure(accountant: str, sequences: int = SEQUENCES, batch_size: int = BATCH_SIZE) -> dict:
    budget = PrivacyBudget(TARGET_EPSILON, DELTA, accountant)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "privacy_ledger.json"
        half = ROUNDS // 2
        _train_rounds(path, accountant, range(1, half + 1), sequences, batch_size)
        restarted = multiprocessing.get_context("spawn").Process(
            target=_train_rounds, args=(path, accountant, range(half + 1, ROUNDS + 1), sequences, batch_size)
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
        taken = [tuple(json.loads(line)) for line in Path(f"{path}.taken.jsonl").read_text().splitlines()]

    reference = ACCOUNTANTS[accountant]()
    for sigma, sample_rate, steps in taken:
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=sample_rate)
    naive = ACCOUNTANTS[accountant]()
    naive.history = [taken[-1]]
    epsilon_reference = float(reference.get_epsilon(delta=DELTA))
    return {
        "accountant": accountant,
        "patients": sequences,
        "batch_size": batch_size,
        "rounds": len(taken),
        "rounds_in_ledger": len(history),
        "local_epochs": LOCAL_EPOCHS,
        "restart": f"new ledger from disk every round; rounds {half + 1}..{ROUNDS} in another process",
        "sample_rate": taken[0][1],
        "steps_per_round": taken[0][2],
        "noise_multiplier": taken[0][0],
        "target_epsilon": TARGET_EPSILON,
        "delta": DELTA,
        "epsilon_ledger": epsilon_ledger,
        "epsilon_reference": epsilon_reference,
        "rel_error": abs(epsilon_ledger - epsilon_reference) / epsilon_reference,
        "epsilon_naive_per_round_engine": float(naive.get_epsilon(delta=DELTA)),
        "seconds": round(time.perf_counter() - start, 2),
    }


HISTORY_ROUNDS = 100


def _long_history(rounds: int) -> dict:
    from client import privacy_ledger

    training, evaluation = (1.1, 1 / 13, 13), (3.0, 1.0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        budget = privacy_ledger.PrivacyBudget(10_000.0, DELTA)
        ledger = privacy_ledger.PrivacyLedger(Path(tmp) / "ledger.json", budget)
        for index in range(rounds):
            ledger.record_round(*training, round_id=f"round-{index}")
            ledger.record_round(*evaluation, round_id=f"round-{index}-evaluation")
        privacy_ledger.clear_accounting_cache()  # a new process: nothing memoised
        start = time.perf_counter()
        epsilon = ledger.record_round(*training, round_id=f"round-{rounds}")
        ledger_s = time.perf_counter() - start
        reference = RDPAccountant()
        reference.history = list(ledger.history)
        start = time.perf_counter()
        opacus_epsilon = reference.get_epsilon(delta=DELTA)
        opacus_s = time.perf_counter() - start
    return {"rounds": rounds, "segments": len(reference.history), "epsilon": epsilon,
            "same_epsilon": epsilon == opacus_epsilon, "ledger_record_s": round(ledger_s, 3),
            "opacus_get_epsilon_s": round(opacus_s, 3), "speedup": round(opacus_s / ledger_s, 1)}


def run(quick: bool) -> dict:
    """Measure the ledger over ROUNDS rounds with RDP (and PRV unless quick), and with a loader Opacus
    wraps into one batch fewer (93 patients in batches of 1: 92 batches), where a plan made from the
    unwrapped loader would record more than planned and refuse the last round."""
    result = _measure("rdp")
    result["wrapped_loader_has_fewer_batches"] = _measure("rdp", sequences=93, batch_size=1)
    result["long_history"] = _long_history(HISTORY_ROUNDS // 4 if quick else HISTORY_ROUNDS)
    if not quick:
        result["prv"] = _measure("prv")
    return result
