import json
import logging
import shutil

import numpy as np
import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine

from client.cli import main as site_main
from client.feature_cache import FeatureCache
from client.prepare import prepare_site
from client.privacy_ledger import BudgetExceeded, PrivacyLedger
from client.private_training import PrivateRound, train_round
from client.sequence_data import PatientSequences, SlideFeatures, predict_slides
from client.site_config import load_site_config
from shared.model import SequenceHead
from shared.run_config import PrivacyConfig, TrainingConfig
from tests.conftest import write_site_yaml


def separable_slides(n_per_class=12, tiles=20, dim=2048, seed=0):
    """Slides whose tile vectors point in a class-specific direction: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((2, dim)).astype(np.float32)
    slides = []
    for label in (0, 1):
        for i in range(n_per_class):
            features = directions[label] + 0.5 * rng.standard_normal((tiles, dim)).astype(np.float32)
            slides.append(SlideFeatures(f"s{label}-{i}", f"p{label}-{i}", label, np.abs(features)))
    return slides


def test_per_sample_gradient_is_per_unit():
    """Change one tile of one unit: only that unit's per-sample gradient changes."""
    torch.manual_seed(0)
    head = GradSampleModule(SequenceHead(2, "rnn", projection=16, hidden=8))
    x = torch.randn(3, 6, 2048)  # three units (slides), six tiles each
    y = torch.tensor([0, 1, 0])

    def per_sample(inputs):
        head.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(head(inputs), y, reduction="sum").backward()
        return {n: p.grad_sample.clone() for n, p in head.named_parameters()}

    before = per_sample(x)
    changed = x.clone()
    changed[1, 4] += 3.0  # one tile of unit 1
    after = per_sample(changed)
    for name in before:
        assert before[name].shape[0] == 3
        torch.testing.assert_close(after[name][[0, 2]], before[name][[0, 2]])
    assert any(not torch.allclose(after[n][1], before[n][1]) for n in before)


def test_patient_is_one_sample():
    slides = [SlideFeatures("a", "p1", 0, np.zeros((5, 4), np.float32)),
              SlideFeatures("b", "p1", 0, np.ones((5, 4), np.float32)),
              SlideFeatures("c", "p2", 1, np.ones((3, 4), np.float32))]
    dataset = PatientSequences(slides, length=4)
    assert len(dataset) == 2
    sequence, label = dataset[1]
    assert sequence.shape == (4, 4) and label == 1


def test_training_learns_without_dp(caplog):
    slides = separable_slides()
    head = SequenceHead(2, "rnn", projection=32, hidden=16)
    with caplog.at_level(logging.WARNING, logger="fedpath.site"):
        result = train_round(head, PatientSequences(slides, 8), TrainingConfig(epochs=6, batch_size=4),
                             PrivacyConfig(enabled=False), ledger_path=None, round_id="r1", progress=False)
    assert "DIFFERENTIAL PRIVACY IS OFF" in caplog.text
    assert result.epsilon is None
    accuracy = (predict_slides(head, slides, 8).argmax(1) == [s.label for s in slides]).mean()
    assert accuracy >= 0.9


def test_dp_rounds_spend_the_planned_budget_then_refuse(tmp_path):
    slides = separable_slides(n_per_class=16)
    privacy = PrivacyConfig(epsilon=4.0, planned_rounds=2)
    training = TrainingConfig(epochs=2, batch_size=8)
    ledger = tmp_path / "ledger.json"
    head = SequenceHead(2, "gru", projection=16, hidden=8)
    first = train_round(head, PatientSequences(slides, 8), training, privacy, ledger, "1", progress=False)
    second = train_round(head, PatientSequences(slides, 8), training, privacy, ledger, "2", progress=False)
    assert 0 < first.epsilon < second.epsilon <= 4.0 * (1 + 1e-6)
    assert second.epsilon == pytest.approx(4.0, rel=0.01)  # noise was chosen for both rounds
    assert first.noise_multiplier == second.noise_multiplier
    with pytest.raises(BudgetExceeded):
        train_round(head, PatientSequences(slides, 8), training, privacy, ledger, "3", progress=False)
    assert len(json.loads(ledger.read_text())["rounds"]) == 2  # the refused round left no trace


def _flat(head: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in head.parameters()])


def test_the_same_round_twice_gives_different_updates_not_replayable_from_the_plan(tmp_path):
    """The server knows the model, the plan and its seed; the site's noise and sampling come from the OS,
    so training the same round twice on the same data gives different weights. A simulation's explicit
    noise seed makes them equal (and is the only way to)."""
    slides = separable_slides(n_per_class=8)
    privacy, training = PrivacyConfig(epsilon=8.0, planned_rounds=1), TrainingConfig(epochs=1, batch_size=4)

    def trained(name: str, noise_seed=None) -> torch.Tensor:
        torch.manual_seed(0)  # everything the server could fix: the starting model, global RNG state
        head = SequenceHead(2, "rnn", projection=16, hidden=8)
        train_round(head, PatientSequences(slides, 8, seed=5), training, privacy, tmp_path / f"{name}.json", "1",
                    progress=False, noise_seed=noise_seed)
        return _flat(head)

    assert (trained("a") - trained("b")).abs().max() > 1e-4
    assert torch.equal(trained("c", noise_seed=7), trained("d", noise_seed=7))


@pytest.mark.filterwarnings("ignore")
def test_the_plan_is_made_from_the_loader_opacus_wraps_for_every_batch_count(tmp_path, monkeypatch):
    """k patients in batches of 1: Opacus' Poisson loader has int(1 / (1/k)) batches, k - 1 for some k. The
    plan's sample rate and steps must be what Opacus' accountant records, or the ledger records more than
    planned and refuses the last round. (σ is irrelevant to that equality: the search is stubbed here and
    run for real in the next test.)"""
    monkeypatch.setattr(PrivacyLedger, "_search_sigma", lambda self, *args: 1.0)
    mismatched = []
    for k in range(1, 201):
        dataset = [(torch.zeros(1), 0)] * k
        session = PrivateRound(torch.nn.Linear(1, 2), dataset, TrainingConfig(epochs=1, batch_size=1),
                               PrivacyConfig(epsilon=8.0, planned_rounds=5), tmp_path / f"k{k}.json")
        steps = len(session.loader)  # the batches the training loop runs per epoch
        assert sum(1 for _ in session.loader.batch_sampler) == steps
        if steps != k:
            mismatched.append(k)
        assert session.plan.training_segment == (1.0, 1 / steps, steps)
        model, engine = torch.nn.Linear(1, 2), PrivacyEngine(accountant="rdp")  # what Opacus records per step
        model, optimizer, _ = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                                  data_loader=session.loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                                  poisson_sampling=False)
        torch.nn.functional.cross_entropy(model(torch.zeros(1, 1)), torch.zeros(1, dtype=torch.long)).backward()
        optimizer.step()
        assert engine.accountant.history == [(1.0, 1 / steps, 1)]
    assert {93, 99, 105} <= set(mismatched)  # the sizes the old plan (1/k, k steps) over-recorded


@pytest.mark.parametrize("patients", [1, 2, 93])
def test_five_planned_rounds_train_and_record_exactly_the_plan(tmp_path, patients):
    slides = [SlideFeatures(f"s{i}", f"p{i}", i % 2, np.abs(np.random.default_rng(i).standard_normal((4, 8)))
                            .astype(np.float32)) for i in range(patients)]
    privacy, training = PrivacyConfig(epsilon=8.0, planned_rounds=5), TrainingConfig(epochs=1, batch_size=1)
    head = SequenceHead(2, "mean", input_dim=8, projection=4, hidden=4)
    for round_ in range(1, 6):  # a fresh session each round, as a fresh site process would
        result = train_round(head, PatientSequences(slides, 2, seed=round_), training, privacy,
                             tmp_path / "ledger.json", f"round-{round_}", progress=False)
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    plan = ledger["plan"]
    assert [r["steps"] for r in ledger["rounds"]] == [plan["steps_per_round"]] * 5 == [result.steps] * 5
    assert {r["sample_rate"] for r in ledger["rounds"]} == {plan["sample_rate"]} == {result.sample_rate}
    assert result.epsilon <= 8.0 * (1 + 1e-6)


@pytest.mark.parametrize("mode", ["tiles", "grid"])
def test_train_local_end_to_end(tmp_path, generated_manifests, capsys, mode):
    folder = tmp_path / "site"
    shutil.copytree(generated_manifests[1].parent, folder)
    site = write_site_yaml(folder, {"manifest": "manifest.csv", "val_fraction": 0.25},
                           training={"epochs": 2, "batch_size": 2}, sequences={"length": 4},
                           model={"mode": mode}, tiling={"tile_size": 128})
    assert site_main(["train-local", "--config", str(site), "--no-progress"]) == 2  # not prepared yet
    assert "fedpath-site prepare" in capsys.readouterr().err
    prepare_site(load_site_config(site), progress=False)
    entry = FeatureCache(folder / "cache")
    some = next(iter(entry.read_index().items.values()))
    assert entry.load(some["key"]).features.shape[1:] == ((4, 2048) if mode == "grid" else (2048,))  # 2x2 map
    assert site_main(["train-local", "--config", str(site), "--no-progress"]) == 0
    assert "ε spent" in capsys.readouterr().out
    run = next((folder / "runs" / "local").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert 0 < metrics["round"]["epsilon"] <= 8.0 * (1 + 1e-6)
    assert set(metrics["final"]["val"]) >= {"accuracy", "auc", "sensitivity", "specificity", "confusion_matrix"}
    checkpoint = torch.load(run / "model.pt", weights_only=False)
    assert checkpoint["classes"] == ["adenocarcinoma", "adenoma"]
    head = SequenceHead(2, checkpoint["model"]["core"], projection=checkpoint["model"]["projection"],
                        hidden=checkpoint["model"]["hidden"])
    head.load_state_dict(checkpoint["state_dict"])


@pytest.mark.parametrize("batch", [16, 0])
def test_ghost_clipping_gives_the_per_patient_clipped_update(batch):
    """train_round uses Opacus' ghost clipping; it must equal clipping materialised per-sample
    gradients (hooks mode), clipping active, noise off; and survive an empty Poisson batch."""
    import copy
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(32, 8, 2048).abs(), torch.randint(0, 2, (32,))
    base = SequenceHead(2, "rnn")

    def one_step(mode):
        head = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = PrivacyEngine().make_private(
                module=head, optimizer=torch.optim.SGD(head.parameters(), lr=0.1),
                data_loader=DataLoader(TensorDataset(x, y), batch_size=16), criterion=torch.nn.CrossEntropyLoss(),
                noise_multiplier=0.0, max_grad_norm=0.5, poisson_sampling=True, grad_sample_mode=mode)
        model, optimizer, criterion = (out[0], out[1], out[2]) if mode == "ghost" else (out[0], out[1], None)
        logits = model(x[:batch])
        loss = (criterion(logits, y[:batch]) if criterion else
                torch.nn.functional.cross_entropy(logits, y[:batch], reduction="sum") / max(batch, 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return [p.detach() for p in head.parameters()]

    for ghost, hooks in zip(one_step("ghost"), one_step("hooks"), strict=True):
        assert torch.isfinite(ghost).all()
        torch.testing.assert_close(ghost, hooks, rtol=1e-5, atol=1e-6)


def test_runs_started_in_the_same_second_get_their_own_folder(tmp_path, monkeypatch):
    from shared import run_dirs as module

    monkeypatch.setattr(module.time, "strftime", lambda fmt: "20260101-000000")
    folders = {module.new_run_dir(tmp_path) for _ in range(3)}
    assert {f.name for f in folders} == {"20260101-000000", "20260101-000000-1", "20260101-000000-2"}
