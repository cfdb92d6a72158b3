"""client.federated_round on one tiny prepared generated site: training under the ledger, refusals, evaluation."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import client.prepare as prepare_module
from client import federated_round
from client.feature_cache import FeatureCache
from client.federated_round import FIT_METRICS, ledger_path, round_privacy
from client.prepare import prepare_site
from client.site_config import load_site_config
from shared.model import ModelConfig, build_head
from shared.parameters import model_arrays
from shared.round_plan import PrivacyTarget, RoundPlan
from simulations.slide_generator import SlideSpec, make_site_slides
from tests.conftest import write_site_yaml

SITE_CLASSES = ("adenocarcinoma", "adenoma")  # the site's own (sorted) class order
MODEL = ModelConfig(projection=16, hidden=8)
# 2 µm/px makes a 1024-px slide a 512-px image: about a dozen 96-px tiles for the whole site
TILING = {"target_mpp": 2.0}


class PixelEncoder(torch.nn.Module):
    """Stands in for InceptionV3 in prepare (seconds to build and run on two busy cores; the values of
    the vectors do not matter here): fixed random 2048-d features of a tile's 4x4 colour means."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("projection", torch.randn(48, 2048, generator=torch.Generator().manual_seed(0)))

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        means = torch.nn.functional.adaptive_avg_pool2d(tiles.float() / 255, 4).flatten(1)
        return torch.relu(means @ self.projection - 0.1) + 1e-3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    """One generated hospital (4 slides: 2 patients train, 2 val), prepared once for the module."""
    root = tmp_path_factory.mktemp("federated-round")
    [manifest] = make_site_slides(root, sites=1, slides_per_site=4, seed=7, spec=SlideSpec(width=1024, height=1024))
    site = write_site_yaml(manifest.parent, {"manifest": "manifest.csv", "val_fraction": 0.25}, tiling=TILING)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prepare_module, "load_encoder", lambda weights, threads=0: PixelEncoder().eval())
        prepare_site(load_site_config(site), progress=False)
    cache = FeatureCache(manifest.parent / "cache")
    index = cache.read_index()
    some = next(iter(index.items.values()))
    assert cache.load(some["key"]).features.shape == (some["tiles"], 2048)
    splits = [item["split"] for item in index.items.values()]
    assert tuple(index.classes) == SITE_CLASSES and splits.count("train") == 2 and splits.count("val") == 2
    return {"manifest": manifest, "cache": manifest.parent / "cache"}


def _site(prepared: dict, folder: Path, **sections):
    """A site.yaml of its own (own state_dir, so its own ledgers) reading the prepared cache."""
    folder.mkdir(parents=True, exist_ok=True)
    features = {"cache_dir": str(prepared["cache"]), **sections.pop("features", {})}
    path = write_site_yaml(folder, {"manifest": str(prepared["manifest"]), "val_fraction": 0.25}, tiling=TILING,
                           features=features, **sections)
    return load_site_config(path)


def _plan(**changes) -> RoundPlan:
    values = dict(federation_id="fed-test", round=1, planned_rounds=2, classes=SITE_CLASSES, model=MODEL,
                  sequence_length=2, epochs=1, batch_size=2, learning_rate=0.01,
                  privacy=PrivacyTarget(required=True, epsilon=8.0, delta=1e-5))
    values.update(changes)
    return RoundPlan(**values)


def _global(plan: RoundPlan) -> list[np.ndarray]:
    torch.manual_seed(0)
    return list(model_arrays(build_head(plan.model, len(plan.classes))).values())


def _ledger(config, plan) -> dict:
    return json.loads(ledger_path(config, plan).read_text())


def _assert_refused(reply, received, code):
    assert reply.metrics["refused"] == code
    assert reply.examples == 0
    assert set(reply.metrics) == set(FIT_METRICS)
    assert [a.shape for a in reply.arrays] == [a.shape for a in received]
    assert all(a.dtype == np.float32 and not a.any() for a in reply.arrays)


def test_fit_trains_under_the_ledger(prepared, tmp_path):
    config, plan = _site(prepared, tmp_path / "site"), _plan()
    received = _global(plan)
    reply = federated_round.fit(config, plan, received)
    assert set(reply.metrics) == set(FIT_METRICS)
    assert reply.metrics["refused"] == 0 and reply.examples == 2  # two training patients
    assert [a.shape for a in reply.arrays] == [a.shape for a in received]
    assert all(np.isfinite(a).all() for a in reply.arrays)
    assert any(np.abs(a).max() > 0 for a in reply.arrays)  # an update, not the model
    metrics = reply.metrics
    assert 0 < metrics["epsilon"] <= 8.0 * (1 + 1e-6)
    assert metrics["delta"] == 1e-5 and metrics["budget_epsilon"] == 8.0
    assert metrics["noise_multiplier"] > 0 and math.isfinite(metrics["train_loss"]) and metrics["train_seconds"] > 0
    assert math.isnan(metrics["would_spend"])
    path = Path(config.state_dir) / "ledgers" / "fed-test.json"
    assert ledger_path(config, plan) == path and path.is_file()
    ledger = json.loads(path.read_text())
    assert [r["round_id"] for r in ledger["rounds"]] == ["round-1"]
    assert ledger["plan"]["planned_rounds"] == 2 and ledger["budget"]["epsilon"] == 8.0
    assert ledger["rounds"][0]["epsilon_after"] == pytest.approx(metrics["epsilon"])

    # the same round again (the first reply was lost): trains and spends again under its own id
    again = federated_round.fit(config, plan, received)
    assert again.metrics["refused"] == 0 and again.examples == 2
    rounds = _ledger(config, plan)["rounds"]
    assert [r["round_id"] for r in rounds] == ["round-1", "round-1-retry1"]
    assert metrics["epsilon"] < again.metrics["epsilon"] <= 8.0 * (1 + 1e-6)


def test_spent_budget_refuses_with_the_numbers(prepared, tmp_path):
    config, plan = _site(prepared, tmp_path / "site"), _plan(planned_rounds=1)
    received = _global(plan)
    first = federated_round.fit(config, plan, received)
    assert first.metrics["refused"] == 0 and first.metrics["epsilon"] == pytest.approx(8.0, rel=0.01)
    second = federated_round.fit(config, replace(plan, round=2), received)
    _assert_refused(second, received, 1)
    metrics = second.metrics
    assert metrics["budget_epsilon"] == 8.0
    assert metrics["would_spend"] > metrics["budget_epsilon"]
    assert metrics["epsilon"] == pytest.approx(first.metrics["epsilon"])  # what was spent so far
    assert math.isnan(metrics["train_loss"])
    assert [r["round_id"] for r in _ledger(config, plan)["rounds"]] == ["round-1"]  # nothing recorded


def test_a_changed_plan_is_refused(prepared, tmp_path):
    config, plan = _site(prepared, tmp_path / "site"), _plan()
    received = _global(plan)
    assert federated_round.fit(config, plan, received).metrics["refused"] == 0
    changed = federated_round.fit(config, replace(plan, round=2, planned_rounds=5), received)
    _assert_refused(changed, received, 2)

    # the site lowered its budget after the ledger was written: refused too, and evaluation still works
    lowered = _site(prepared, tmp_path / "site", privacy={"epsilon": 4.0})
    _assert_refused(federated_round.fit(lowered, replace(plan, round=2), received), received, 2)
    assert [r["round_id"] for r in _ledger(config, plan)["rounds"]] == ["round-1"]
    assert _ledger(config, plan)["budget"]["epsilon"] == 8.0
    _, evaluation = federated_round.evaluate(lowered, replace(plan, round=2), received)
    assert evaluation.examples == 2 and math.isnan(evaluation.metrics["epsilon"])


def test_an_update_failing_the_outgoing_checks_is_withheld(prepared, tmp_path):
    config, plan = _site(prepared, tmp_path / "site"), _plan(max_update_norm=1e-9)
    received = _global(plan)
    reply = federated_round.fit(config, plan, received)
    _assert_refused(reply, received, 6)
    assert 0 < reply.metrics["epsilon"] <= 8.0 * (1 + 1e-6)  # the round was trained: its privacy is spent
    assert [r["round_id"] for r in _ledger(config, plan)["rounds"]] == ["round-1"]
    heavy = federated_round.fit(config, _plan(round=2, secagg_max_weight=1, secagg_clipping_range=1.0), received)
    _assert_refused(heavy, received, 6)  # 2 patients > max_weight 1


def test_site_without_dp_refuses_when_the_federation_requires_it(prepared, tmp_path):
    config = _site(prepared, tmp_path / "site", privacy={"enabled": False})
    plan = _plan()
    received = _global(plan)
    reply = federated_round.fit(config, plan, received)
    _assert_refused(reply, received, 3)
    assert not ledger_path(config, plan).exists()

    # a federation that does not require DP gets a non-private update (and no ledger)
    open_plan = replace(plan, privacy=PrivacyTarget(required=False))
    trained = federated_round.fit(config, open_plan, received)
    assert trained.metrics["refused"] == 0 and trained.examples == 2
    assert math.isnan(trained.metrics["epsilon"]) and not ledger_path(config, open_plan).exists()


def test_other_classes_are_refused(prepared, tmp_path):
    config = _site(prepared, tmp_path / "site")
    plan = _plan(classes=("adenoma", "carcinoma"))
    received = _global(plan)
    _assert_refused(federated_round.fit(config, plan, received), received, 4)
    loss, reply = federated_round.evaluate(config, plan, received)  # no evaluation either
    assert loss == 0.0 and reply.examples == 0
    assert sum(v for k, v in reply.metrics.items() if k.startswith("cm_")) == 0


def test_federation_classes_in_another_order_and_with_more_classes(prepared, tmp_path):
    config = _site(prepared, tmp_path / "site")
    plan = _plan(classes=("normal", "adenoma", "adenocarcinoma"))
    received = _global(plan)
    reply = federated_round.fit(config, plan, received)
    assert reply.metrics["refused"] == 0 and [a.shape for a in reply.arrays] == [a.shape for a in received]
    assert received[-1].shape == (3,)  # the classifier's bias: a three-class head
    _, evaluation = federated_round.evaluate(config, plan, received)
    cm = {k: v for k, v in evaluation.metrics.items() if k.startswith("cm_")}
    assert len(cm) == 9 and sum(cm.values()) == 2
    # the site's two val slides are one adenocarcinoma (class 2 here) and one adenoma (class 1); none is normal
    assert sum(cm[f"cm_0_{j}"] for j in range(3)) == 0
    assert sum(cm[f"cm_1_{j}"] for j in range(3)) == 1 and sum(cm[f"cm_2_{j}"] for j in range(3)) == 1


def test_grid_model_against_a_tiles_cache_is_refused(prepared, tmp_path):
    config = _site(prepared, tmp_path / "site")
    plan = _plan(model=replace(MODEL, mode="grid"))
    received = _global(plan)
    reply = federated_round.fit(config, plan, received)
    _assert_refused(reply, received, 5)


def test_unprepared_site_is_refused(prepared, tmp_path):
    config = _site(prepared, tmp_path / "site", features={"cache_dir": str(tmp_path / "empty-cache")})
    plan = _plan()
    received = _global(plan)
    _assert_refused(federated_round.fit(config, plan, received), received, 5)


def test_evaluate_reports_loss_slides_confusion_and_epsilon(prepared, tmp_path):
    config, plan = _site(prepared, tmp_path / "site"), _plan()
    received = _global(plan)
    loss, reply = federated_round.evaluate(config, plan, received)
    assert math.isfinite(loss) and loss > 0
    assert reply.examples == 2 and reply.arrays == []  # validation slides, not patients
    cm = {k: v for k, v in reply.metrics.items() if k.startswith("cm_")}
    assert set(cm) == {"cm_0_0", "cm_0_1", "cm_1_0", "cm_1_1"} and sum(cm.values()) == reply.examples
    assert cm["cm_0_0"] + cm["cm_0_1"] == 1 and cm["cm_1_0"] + cm["cm_1_1"] == 1  # one val slide per class
    assert reply.metrics["accuracy"] == pytest.approx((cm["cm_0_0"] + cm["cm_1_1"]) / 2)
    assert {"balanced_accuracy", "sensitivity", "specificity", "auc"} <= set(reply.metrics)
    assert math.isnan(reply.metrics["epsilon"])  # nothing spent yet in this federation

    fit = federated_round.fit(config, plan, received)
    _, after = federated_round.evaluate(config, plan, received)
    assert after.metrics["epsilon"] == pytest.approx(fit.metrics["epsilon"])
    assert math.isnan(federated_round.evaluate(config, replace(plan, federation_id="other"), received)[1]
                      .metrics["epsilon"])


def test_the_site_budget_caps_the_federation_target(prepared, tmp_path):
    config = _site(prepared, tmp_path / "site", privacy={"epsilon": 2.0, "delta": 1e-6, "max_grad_norm": 0.5})
    plan = _plan()
    privacy = round_privacy(config, plan)
    assert (privacy.epsilon, privacy.delta, privacy.planned_rounds) == (2.0, 1e-6, 2)
    assert privacy.enabled and privacy.max_grad_norm == 0.5
    looser = round_privacy(config, replace(plan, privacy=PrivacyTarget(epsilon=1.0, delta=1e-5)))
    assert (looser.epsilon, looser.delta) == (1.0, 1e-6)  # the smaller of the two, each

    received = _global(plan)
    reply = federated_round.fit(config, plan, received)
    assert reply.metrics["refused"] == 0 and reply.metrics["budget_epsilon"] == 2.0
    assert 0 < reply.metrics["epsilon"] <= 2.0 * (1 + 1e-6) and reply.metrics["delta"] == 1e-6
    assert _ledger(config, plan)["budget"] == {"epsilon": 2.0, "delta": 1e-6, "accountant": "rdp"}
