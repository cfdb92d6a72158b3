"""client.federated_round on one tiny prepared generated site: what a reply carries (only the masked-sum
vector and the disclosed numbers), private noise, evaluation releases under the ledger, refusals."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import client.app
from client import federated_round, secure_round
from client.app import SiteClient, SiteRefusal
from client.feature_cache import FeatureCache
from client.federated_round import ledger_path, round_privacy
from client.prepare import prepare_site
from client.site_config import load_site_config
from client.site_rounds import read_rounds, sent_reply_path
from shared.model import ModelConfig, build_head
from shared.parameters import ParameterMismatch, model_arrays, pack
from shared.round_plan import PrivacyTarget, RoundPlan
from shared.round_sums import CountLayout, decode_sum
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
    prepare_site(load_site_config(site), progress=False,
                 encoder_loader=lambda weights, threads=0, device="cpu", backbone="inception_v3": PixelEncoder().eval())
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
                  privacy=PrivacyTarget(required=True, epsilon=8.0, delta=1e-5), evaluations=3, weight_scale=50)
    values.update(changes)
    return RoundPlan(**values)


def _global(plan: RoundPlan) -> list[np.ndarray]:
    torch.manual_seed(0)
    return list(model_arrays(build_head(plan.model, len(plan.classes))).values())


def _ledger(config, plan) -> dict:
    return json.loads(ledger_path(config, plan).read_text())


def _read(reply, plan):
    """What the server would read if this site were the only one in the round."""
    layout = CountLayout(len(plan.classes), plan.evaluation_bins, 1)
    return decode_sum(reply.arrays, layout, plan.weight_scale, [a.shape for a in _global(plan)] if plan.train else [])


def _wire_shape(plan, received) -> list[tuple[int]]:
    """A reply is one vector: the model's values, then the patients and the evaluation counts."""
    return [(sum(a.size for a in received) + 1 + CountLayout(len(plan.classes), plan.evaluation_bins, 1).size,)]


def _assert_refused(reply, plan, received, code):
    assert reply.metrics["refused"] == code
    assert reply.examples == plan.weight_scale  # the same plaintext weight as everyone's
    assert set(reply.metrics) == {"epsilon", "refused"}
    assert [a.shape for a in reply.arrays] == _wire_shape(plan, received)
    assert all(a.dtype == np.float32 and not a.any() for a in reply.arrays)  # zeros: nothing of the site


def test_fit_sends_one_vector_and_only_the_disclosed_numbers(prepared, tmp_path):
    config, plan = _site(prepared, tmp_path / "site", federation={"keep_sent_replies": True}), _plan()
    received = _global(plan)
    with pytest.raises(ParameterMismatch, match=r"received 5 values, the model the plan names has \d+ in \d+ tensors"):
        federated_round.fit(config, plan, [np.zeros(5, np.float32)])  # another model's vector: nothing trains
    reply = federated_round.fit(config, plan, pack(received))  # as the wire brings it: one vector
    assert set(reply.metrics) == {"epsilon", "refused"}  # the default disclose list
    assert reply.metrics["refused"] == 0 and 0 < reply.metrics["epsilon"] <= 8.0 * (1 + 1e-6)
    assert reply.examples == plan.weight_scale
    assert [a.shape for a in reply.arrays] == _wire_shape(plan, received)
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in reply.arrays)
    assert all(np.abs(a).max() <= 1.0 for a in reply.arrays)  # within SecAgg+'s clipping range
    read = _read(reply, plan)
    assert read.patients == pytest.approx(2, abs=1e-3)  # two training patients, inside the vector
    assert any(np.abs(u).max() > 0 for u in read.update)  # an update, not the model
    # the received model's evaluation counts, noisy: two validation patients' worth, give or take the noise
    assert read.evaluation.vector().shape == (2 * plan.evaluation_bins,)

    ledger = _ledger(config, plan)
    assert [(r["round_id"], r["kind"]) for r in ledger["rounds"]] == [("round-1-evaluation", "evaluation"),
                                                                       ("round-1", "training")]
    assert ledger["plan"]["evaluations"] == 3 and ledger["plan"]["evaluation_share"] == 0.25
    assert ledger["rounds"][-1]["epsilon_after"] == pytest.approx(reply.metrics["epsilon"])
    # per-site numbers stay at the site
    [record] = read_rounds(config, plan.federation_id)
    assert record["patients"] == 2 and math.isfinite(record["train_loss"]) and record["steps"] >= 1
    assert record["val"]["slides"] == 2 and 0 <= record["val"]["accuracy"] <= 1

    # the same round again (the first reply was lost): trains and spends again under its own id
    again = federated_round.fit(config, plan, received)
    assert again.metrics["refused"] == 0
    assert [r["round_id"] for r in _ledger(config, plan)["rounds"]][2:] == ["round-1-retry1-evaluation",
                                                                           "round-1-retry1"]
    assert reply.metrics["epsilon"] < again.metrics["epsilon"] <= 8.0 * (1 + 1e-6)
    # both replies left, so the site keeps both (a retry never overwrites the first)
    first, retry = (np.load(sent_reply_path(config, plan.federation_id, 1, attempt)) for attempt in (0, 1))
    assert all(np.array_equal(a, b) for a, b in zip(first.values(), reply.arrays, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(retry.values(), again.arrays, strict=True))


def test_the_noise_is_private_not_replayable_from_the_plan(prepared, tmp_path):
    """The same plan and model at two copies of the site give different updates (the server knows both
    inputs); only a simulation's explicit noise seed makes them equal."""
    plan = _plan()
    received = _global(plan)
    updates = [_read(federated_round.fit(_site(prepared, tmp_path / f"site-{i}"), plan, received), plan).update
               for i in range(2)]
    assert max(float(np.abs(a - b).max()) for a, b in zip(*updates, strict=True)) > 1e-4
    replayable = replace(plan, reproducible_noise=True)
    seeded = [_read(federated_round.fit(_site(prepared, tmp_path / f"seeded-{i}"), replayable, received,
                                        noise_seed=1234), plan).update for i in range(2)]
    assert max(float(np.abs(a - b).max()) for a, b in zip(*seeded, strict=True)) == 0.0
    # a deployed site (no simulation seed) refuses a plan that asks for replayable noise
    refused = federated_round.fit(_site(prepared, tmp_path / "deployed"), replace(plan, reproducible_noise=True),
                                  received)
    _assert_refused(refused, plan, received, 15)


def test_disclose_decides_the_plain_numbers(prepared, tmp_path):
    plan = _plan()
    received = _global(plan)
    silent = federated_round.fit(_site(prepared, tmp_path / "silent", disclose=[]), plan, received)
    assert silent.metrics == {} and _read(silent, plan).patients == pytest.approx(2, abs=1e-3)
    chatty = federated_round.fit(_site(prepared, tmp_path / "chatty", disclose=["epsilon", "delta", "train_seconds"]),
                                 plan, received)
    assert set(chatty.metrics) == {"epsilon", "delta", "train_seconds"} and chatty.metrics["delta"] == 1e-5


def test_evaluation_only_and_no_evaluation(prepared, tmp_path, caplog):
    config, plan = _site(prepared, tmp_path / "site"), _plan()
    received = _global(plan)
    scoring = replace(plan, round=3, train=False)
    with caplog.at_level("INFO", logger="fedpath.site"):
        final = federated_round.fit(config, scoring, received)
    # the site's log says what happened: no "trained on 0 patients" for the scoring-only exchange
    assert "round 3: scored the final model (no training)" in caplog.text and "trained on" not in caplog.text
    assert [a.shape for a in final.arrays] == [(1 + 2 * plan.evaluation_bins,)]  # the counts, no model-size zeros
    read = _read(final, scoring)
    assert final.metrics["refused"] == 0 and read.update is None and read.patients == pytest.approx(0, abs=1e-3)
    assert [(r["round_id"], r["kind"]) for r in _ledger(config, plan)["rounds"]] == [
        ("round-3-evaluation", "evaluation")]
    # a site that never releases evaluations: all of its budget goes to training, nothing is counted
    quiet = _site(prepared, tmp_path / "quiet", privacy={"release_evaluation": False})
    reply = federated_round.fit(quiet, plan, received)
    assert not _read(reply, plan).evaluation.vector().any()
    assert [r["kind"] for r in _ledger(quiet, plan)["rounds"]] == ["training"]
    assert _ledger(quiet, plan)["plan"]["evaluations"] == 0


def test_in_a_masked_sum_evaluation_counts_leave_from_every_site_or_from_none(prepared, tmp_path):
    """Under SecAgg+ the counts are summed with the update: a site releases them only when every site of the
    round offered theirs (masked_evaluation True), and one that offered but cannot release them sits out
    (code 17) rather than send zeros that would leave the others' sum of counts to fewer sites."""
    plan = _plan()
    received = _global(plan)
    withheld_site = _site(prepared, tmp_path / "withheld")
    withheld = federated_round.fit(withheld_site, plan, received, masked_evaluation=False)
    assert withheld.metrics["refused"] == 0 and not _read(withheld, plan).evaluation.vector().any()
    assert any(np.abs(u).max() > 0 for u in _read(withheld, plan).update)  # it trained all the same
    assert [r["kind"] for r in _ledger(withheld_site, plan)["rounds"]] == ["training"]  # no release, nothing spent
    [record] = read_rounds(withheld_site, plan.federation_id)
    assert record["evaluate"] is False and "val" not in record

    released_site = _site(prepared, tmp_path / "released")
    released = federated_round.fit(released_site, plan, received, masked_evaluation=True)
    assert _read(released, plan).evaluation.vector().any()
    assert [r["kind"] for r in _ledger(released_site, plan)["rounds"]] == ["evaluation", "training"]

    # offered at setup, then release_evaluation switched off before the collect stage: sits out, zeros nowhere
    switched = _site(prepared, tmp_path / "switched", privacy={"release_evaluation": False})
    _assert_refused(federated_round.fit(switched, plan, received, masked_evaluation=True), plan, received, 17)
    assert not (Path(switched.state_dir) / "ledgers").exists() or not _ledger(switched, plan)["rounds"]


def test_spent_budget_refuses_with_the_numbers(prepared, tmp_path):
    config = _site(prepared, tmp_path / "site", disclose=["epsilon", "refused", "would_spend", "budget_epsilon"])
    plan = _plan(planned_rounds=1, evaluations=2)
    received = _global(plan)
    first = federated_round.fit(config, plan, received)
    assert first.metrics["refused"] == 0 and first.metrics["epsilon"] < 8.0
    second = federated_round.fit(config, replace(plan, round=2), received)
    assert second.metrics["refused"] == 1
    metrics = second.metrics
    assert metrics["budget_epsilon"] == 8.0
    assert metrics["would_spend"] > metrics["budget_epsilon"]
    assert metrics["epsilon"] == pytest.approx(first.metrics["epsilon"])  # what was spent so far
    assert [r["round_id"] for r in _ledger(config, plan)["rounds"]] == ["round-1-evaluation", "round-1"]
    assert not any(a.any() for a in second.arrays)


def test_a_site_that_sits_out_a_masked_round_sends_its_code_not_zeros(prepared, tmp_path, monkeypatch):
    """In a plain round a site that sits out replies zeros and the numbers it discloses. While Flower's mod trains
    for a SecAgg+ sum (client/secure_round.py) a vector of zeros would count the site among the summed ones:
    the ClientApp raises the refusal instead, which leaves as the bare code (client/app.py)."""
    config = _site(prepared, tmp_path / "site", disclose=["epsilon", "refused"])
    silent = _site(prepared, tmp_path / "silent", disclose=[])
    monkeypatch.setattr(client.app, "site_config", lambda path: silent if path.parent.name == "silent" else config)
    site = SiteClient(tmp_path / "site" / "site.yaml")
    plan = _plan(reproducible_noise=True)  # a deployed site refuses replayable noise: code 15
    arrays, examples, metrics = site.fit(_global(plan), plan.to_config())
    assert metrics["refused"] == 15 and examples == plan.weight_scale and not any(a.any() for a in arrays)
    # what secure_stage sets around the collect stage's training
    collecting = secure_round._MASKED_SUM.set(secure_round.MaskedSum(every_site_offered=True))
    try:
        with pytest.raises(SiteRefusal) as refusal:
            site.fit(_global(plan), plan.to_config())
        assert refusal.value.code == 15
        with pytest.raises(SiteRefusal) as refusal:  # a site that does not disclose `refused`: the code says only that
            SiteClient(tmp_path / "silent" / "site.yaml").fit(_global(plan), plan.to_config())
        assert refusal.value.code == 16
        trained = site.fit(_global(plan), _plan().to_config())  # a site that trains sends its update as before
        assert trained[2]["refused"] == 0 and any(a.any() for a in trained[0])
    finally:
        secure_round._MASKED_SUM.reset(collecting)


def test_a_round_redone_after_a_crash_needs_a_spare_round_of_budget(prepared, tmp_path):
    """The server died after this site trained round 2; the resumed run sends round 2 again. Planned for
    exactly two rounds, the budget has no room for it; planned with a spare round (the server's
    ``federation.spare_rounds: 1`` makes the plan three rounds and four evaluations), it trains again under
    its own id."""
    for spare, refused in ((0, 1), (1, 0)):
        config = _site(prepared, tmp_path / f"spare-{spare}")
        plan = _plan(planned_rounds=2 + spare, evaluations=3 + spare)
        received = _global(plan)
        for round_ in (1, 2):
            assert federated_round.fit(config, replace(plan, round=round_), received).metrics["refused"] == 0
        redone = federated_round.fit(config, replace(plan, round=2), received)
        assert redone.metrics["refused"] == refused, spare
        training = [r["round_id"] for r in _ledger(config, plan)["rounds"] if r["kind"] == "training"]
        assert training == ["round-1", "round-2", "round-2-retry1"][:3 - refused]
        # the run's last, scoring-only exchange still fits in the plan (the refused redo spent nothing)
        final = federated_round.fit(config, replace(plan, round=3, train=False), received)
        assert final.metrics["refused"] == 0


def test_a_round_redone_mid_run_without_a_spare_round_takes_the_last_rounds_room(prepared, tmp_path):
    """The server died in round 1 of 2 and resumes with round 1 again: the redo still fits the budget and
    trains under its own id; the budget then has no room for round 2, which is refused (code 1). The site
    never spends more than its plan, whichever round the budget runs out on."""
    config = _site(prepared, tmp_path / "site")
    plan = _plan(planned_rounds=2, evaluations=3)
    received = _global(plan)
    assert federated_round.fit(config, plan, received).metrics["refused"] == 0
    assert federated_round.fit(config, plan, received).metrics["refused"] == 0  # the redo of round 1
    assert federated_round.fit(config, replace(plan, round=2), received).metrics["refused"] == 1
    training = [r["round_id"] for r in _ledger(config, plan)["rounds"] if r["kind"] == "training"]
    assert training == ["round-1", "round-1-retry1"]


def test_a_lifetime_budget_refuses_a_new_federation_before_training(prepared, tmp_path):
    config = _site(prepared, tmp_path / "site", privacy={"lifetime_epsilon": 10.0})
    plan = _plan()
    received = _global(plan)
    assert federated_round.fit(config, plan, received).metrics["refused"] == 0  # reserves ε = 8 for its plan
    second = replace(plan, federation_id="fed-second")
    refused = federated_round.fit(config, second, received)
    _assert_refused(refused, plan, received, 11)
    assert math.isnan(refused.metrics["epsilon"])  # this federation has spent nothing: not the others' total (7.99)
    assert not ledger_path(config, second).exists()  # nothing planned, nothing trained
    # a smaller second federation fits under the lifetime limit
    small = _site(prepared, tmp_path / "site", privacy={"lifetime_epsilon": 10.0, "epsilon": 1.0})
    assert federated_round.fit(small, replace(second, federation_id="fed-small"), received).metrics["refused"] == 0


def test_a_changed_plan_is_refused(prepared, tmp_path):
    config, plan = _site(prepared, tmp_path / "site"), _plan()
    received = _global(plan)
    assert federated_round.fit(config, plan, received).metrics["refused"] == 0
    _assert_refused(federated_round.fit(config, replace(plan, round=2, planned_rounds=5), received), plan, received, 2)
    # the site lowered its budget after the ledger was written: refused too
    lowered = _site(prepared, tmp_path / "site", privacy={"epsilon": 4.0})
    _assert_refused(federated_round.fit(lowered, replace(plan, round=2), received), plan, received, 2)
    assert [r["round_id"] for r in _ledger(config, plan)["rounds"]] == ["round-1-evaluation", "round-1"]
    assert _ledger(config, plan)["budget"]["epsilon"] == 8.0


def test_an_update_failing_the_outgoing_checks_is_withheld(prepared, tmp_path):
    config, plan = _site(prepared, tmp_path / "site"), _plan(max_update_norm=1e-9)
    received = _global(plan)
    reply = federated_round.fit(config, plan, received)
    _assert_refused(reply, plan, received, 6)
    assert [r["round_id"] for r in _ledger(config, plan)["rounds"]][-1] == "round-1"  # privacy was spent
    heavy = _plan(federation_id="fed-heavy", weight_scale=1, secagg_clipping_range=1.0)
    _assert_refused(federated_round.fit(config, heavy, received), heavy, received, 6)  # 2 patients > max_weight 1


def test_a_changed_setting_is_refused_whatever_the_number_of_patients(prepared, tmp_path):
    """A curious server's probe: this site's 2 training patients make one batch at batch size 2 and at 3, so
    a plan checked only through its sample rate and steps accepted 3 and would have refused 1, telling the
    server that the site has at most 3 patients, and a weight S changed each round did the same through
    refusal 6. Every change of what the federation chose is now refused before anything is touched."""
    config, plan = _site(prepared, tmp_path / "site"), _plan()
    received = _global(plan)
    assert federated_round.fit(config, plan, received).metrics["refused"] == 0
    recorded = _ledger(config, plan)["rounds"]
    for change in ({"batch_size": 3}, {"batch_size": 1}, {"epochs": 2}, {"weight_scale": 51},
                   {"weight_scale": 1, "secagg_clipping_range": 1.0}):
        probe = replace(plan, round=2, **change)
        _assert_refused(federated_round.fit(config, probe, received), probe, received, 2)
    assert _ledger(config, plan)["rounds"] == recorded  # refused before any release: nothing spent
    assert _ledger(config, plan)["plan"]["settings"] == {"batch_size": 2, "epochs": 1, "weight_scale": 50}
    assert federated_round.fit(config, replace(plan, round=2), received).metrics["refused"] == 0  # unchanged


def test_site_without_dp_refuses_when_the_federation_requires_it(prepared, tmp_path):
    config = _site(prepared, tmp_path / "site", privacy={"enabled": False})
    plan = _plan()
    received = _global(plan)
    _assert_refused(federated_round.fit(config, plan, received), plan, received, 3)
    assert not ledger_path(config, plan).exists()
    # a federation that does not require DP gets a non-private update, exact counts, and no ledger
    open_plan = replace(plan, privacy=PrivacyTarget(required=False))
    trained = federated_round.fit(config, open_plan, received)
    assert trained.metrics["refused"] == 0 and math.isnan(trained.metrics["epsilon"])
    read = _read(trained, plan)
    assert read.patients == pytest.approx(2, abs=1e-3) and read.evaluation.patients == pytest.approx(2, abs=1e-3)
    assert not ledger_path(config, open_plan).exists()


def test_other_classes_are_refused(prepared, tmp_path):
    config = _site(prepared, tmp_path / "site")
    plan = _plan(classes=("adenoma", "carcinoma"))
    received = _global(plan)
    _assert_refused(federated_round.fit(config, plan, received), plan, received, 4)


def test_federation_classes_in_another_order_and_with_more_classes(prepared, tmp_path):
    config = _site(prepared, tmp_path / "site", privacy={"enabled": False})
    plan = _plan(classes=("normal", "adenoma", "adenocarcinoma"), privacy=PrivacyTarget(required=False))
    received = _global(plan)
    reply = federated_round.fit(config, plan, received)
    assert reply.metrics["refused"] == 0 and [a.shape for a in reply.arrays] == _wire_shape(plan, received)
    assert received[-1].shape == (3,)  # the classifier's bias: a three-class head
    confusion = _read(reply, plan).evaluation.confusion  # exact without DP
    # the site's two val slides are one adenocarcinoma (class 2 here) and one adenoma (class 1); none is normal
    assert confusion.sum() == pytest.approx(2, abs=1e-3)
    assert confusion[0].sum() == pytest.approx(0, abs=1e-3)
    assert confusion[1].sum() == pytest.approx(1, abs=1e-3) and confusion[2].sum() == pytest.approx(1, abs=1e-3)


def test_grid_model_against_a_tiles_cache_is_refused(prepared, tmp_path):
    config = _site(prepared, tmp_path / "site")
    plan = _plan(model=replace(MODEL, mode="grid"))
    received = _global(plan)
    _assert_refused(federated_round.fit(config, plan, received), plan, received, 5)


def test_unprepared_site_is_refused(prepared, tmp_path):
    config = _site(prepared, tmp_path / "site", features={"cache_dir": str(tmp_path / "empty-cache")})
    plan = _plan()
    received = _global(plan)
    _assert_refused(federated_round.fit(config, plan, received), plan, received, 5)


def test_the_site_budget_caps_the_federation_target(prepared, tmp_path):
    config = _site(prepared, tmp_path / "site", privacy={"epsilon": 2.0, "delta": 1e-6, "max_grad_norm": 0.5},
                   disclose=["epsilon", "delta", "budget_epsilon", "refused"])
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


def test_site_status_shows_the_ledgers_and_the_sites_own_numbers(prepared, tmp_path, capsys):
    from client.cli import main as site_main

    config = _site(prepared, tmp_path / "site", privacy={"lifetime_epsilon": 20.0})
    plan = _plan()
    federated_round.fit(config, plan, _global(plan))
    federated_round.fit(config, replace(plan, round=2, classes=("adenoma", "carcinoma")), _global(plan))
    assert site_main(["status", "--config", str(tmp_path / "site" / "site.yaml")]) == 0
    out = capsys.readouterr().out
    assert "fed-test" in out and "of 8 (δ 1e-05, rdp); 1 training round(s), 1 evaluation release(s)" in out
    assert "trained on 2 patients" in out and "validation patients: accuracy" in out
    assert "round 2: sat out, code 4" in out
    assert "lifetime ε 7.99" in out and "of 20 over all federations" in out  # the plan reserves ε 8
    assert "no consortium roster (federation.roster)" in out


def test_a_warm_site_worker_reads_only_what_prepare_changed(prepared, tmp_path, monkeypatch):
    """The task runner serves every round from one process: a second round reads no feature file again,
    and after `prepare` rewrites one entry, only that one is read (``shared/file_memo.py``)."""
    from client.feature_cache import WARM_ENTRIES
    from client.task_runner import WARM_CACHE_BYTES

    config, plan = _site(prepared, tmp_path / "site"), _plan(planned_rounds=3)
    received = _global(plan)
    WARM_ENTRIES.clear()
    monkeypatch.setattr(WARM_ENTRIES, "max_bytes", WARM_CACHE_BYTES)  # what build_runner turns on
    assert federated_round.fit(config, plan, received).metrics["refused"] == 0
    first_reads = WARM_ENTRIES.misses
    assert first_reads == 4 and len(WARM_ENTRIES) == 4  # 2 training + 2 validation slides, each read once
    assert federated_round.fit(config, replace(plan, round=2), received).metrics["refused"] == 0
    assert WARM_ENTRIES.misses == first_reads and WARM_ENTRIES.hits >= 4  # the second round read none

    cache = FeatureCache(prepared["cache"])
    index = cache.read_index()
    key = next(item["key"] for item in index.items.values() if item["split"] == "train")
    entry = cache.load(key)
    cache.save(key, replace(entry, features=entry.features + 1.0))  # what a new `prepare` of that slide writes
    try:
        assert federated_round.fit(config, replace(plan, round=3), received).metrics["refused"] == 0
        assert WARM_ENTRIES.misses == first_reads + 1  # the rewritten entry only
        np.testing.assert_array_equal(cache.load(key).features, entry.features + 1.0)  # and its new vectors
    finally:
        cache.save(key, entry)


def test_a_warm_worker_keeps_training_vectors_on_its_device(prepared, tmp_path, monkeypatch):
    """On a GPU the task runner keeps the training vectors on the device between rounds (``DEVICE_ENTRIES``);
    this machine has no GPU, so the same code runs with the CPU as the device: the round's update is the
    same as from host arrays, a second round uploads nothing, a rewritten entry alone is uploaded again,
    and what does not fit the budget stays on the host."""
    from client import sequence_data
    from client.sequence_data import DEVICE_ENTRIES, load_split

    config, plan = _site(prepared, tmp_path / "site"), replace(_plan(planned_rounds=4), reproducible_noise=True)
    received = _global(plan)
    cpu = torch.device("cpu")
    cache = FeatureCache(prepared["cache"])
    host = [s.features for s in load_split(cache, "train")[0]]
    DEVICE_ENTRIES.clear()
    monkeypatch.setattr(DEVICE_ENTRIES, "max_bytes", 1 << 30)
    monkeypatch.setattr(federated_round, "load_split", lambda c, split, device: load_split(c, split, cpu))
    kept = _read(federated_round.fit(config, plan, received, noise_seed=7), plan).update
    assert DEVICE_ENTRIES.misses == 4 and len(DEVICE_ENTRIES) == 4  # 2 training + 2 validation slides
    monkeypatch.setattr(federated_round, "load_split", lambda c, split, device: load_split(c, split))
    plain = _read(federated_round.fit(_site(prepared, tmp_path / "host"), plan, received, noise_seed=7), plan).update
    assert max(float(np.abs(a - b).max()) for a, b in zip(kept, plain, strict=True)) == 0.0

    first = load_split(cache, "train", cpu)[0]
    assert all(isinstance(s.features, torch.Tensor) for s in first)
    again = load_split(cache, "train", cpu)[0]
    assert all(a.features is b.features for a, b in zip(first, again, strict=True)) and DEVICE_ENTRIES.misses == 4
    key = next(item["key"] for item in cache.read_index().items.values() if item["split"] == "train")
    entry = cache.load(key)
    cache.save(key, replace(entry, features=entry.features + 1.0))  # a new `prepare` of that slide
    try:
        renewed = {s.item_id: s.features for s in load_split(cache, "train", cpu)[0]}
        assert DEVICE_ENTRIES.misses == 5  # the rewritten entry only
        assert any(torch.equal(f, torch.from_numpy(entry.features + 1.0)) for f in renewed.values())
    finally:
        cache.save(key, entry)
    monkeypatch.setattr(DEVICE_ENTRIES, "max_bytes", host[0].nbytes)  # room for one slide per call
    DEVICE_ENTRIES.clear()
    split = load_split(cache, "train", cpu)[0]
    assert isinstance(split[0].features, torch.Tensor) and isinstance(split[1].features, np.ndarray)
    assert sequence_data.device_budget(cpu) == 0  # and a CPU never gets a budget of its own


def test_an_error_reply_leaves_without_its_text_and_the_text_stays_on_one_short_line_of_the_log(caplog):
    """Flower's SecAgg+ mod puts texts into its errors, and some carry what the server sent: the reply leaves
    with the code alone, and the site's log shows the text escaped and cut, so it forges no log line and
    fills no disk."""
    from flwr.app import Error, Message, RecordDict

    from tests.flower_messages import server_message_to

    message = server_message_to(7, RecordDict(), "3")
    reason = "Abort secure aggregation\n12:00:00 INFO fedpath.site: round 3: trained on 9 patients" + "x" * 100_000
    with caplog.at_level("WARNING", logger="fedpath.site"):
        reply = client.app.no_text_leaves(message, None,
                                          lambda m, _: Message(Error(code=1009, reason=reason), reply_to=m))
    assert reply.error.code == 1009 and not reply.error.reason
    [logged] = [r.getMessage() for r in caplog.records if "carried text" in r.getMessage()]
    assert "\n" not in logged and len(logged) < 1000 and "(100083 characters)" in logged
    assert "Abort secure aggregation\\n12:00:00" in logged  # the break shown as an escape, the text still readable


def test_an_unexpected_exception_is_logged_with_its_frames_and_its_message_escaped(caplog):
    """A library's exception message can carry what the server sent (a key, a stage name): the site's log keeps
    the frames (its own code) and the message on one escaped, cut line; only code 13 leaves."""
    from flwr.app import Message, RecordDict

    from tests.flower_messages import server_message_to

    def fails(message, _context):
        raise KeyError("stage\n12:00:00 INFO fedpath.site: round 3: trained on 9 patients" + "y" * 10_000)

    with caplog.at_level("ERROR", logger="fedpath.site"):
        reply = client.app.no_text_leaves(server_message_to(7, RecordDict(), "3"), None, fails)
    assert isinstance(reply, Message) and reply.error.code == 1013 and not reply.error.reason
    [logged] = [r.getMessage() for r in caplog.records if "could not handle" in r.getMessage()]
    first, *frames = logged.split("\n")
    assert "KeyError: 'stage" in first and "12:00:00 INFO" in first  # the forged line stays inside the first
    assert first.endswith("characters)") and len(first) < 600
    assert frames and all(line.startswith("  ") for line in frames)  # the frames: file, line and code of the site
    assert any("in fails" in line for line in frames)


def test_the_exceptions_an_unexpected_one_came_from_are_logged_escaped_too(caplog):
    """A library that wraps an error (``raise ... from``, or a new one while handling it) keeps what the server sent
    in the cause: every link of the chain is in the site's log, each message escaped and cut, a loop ends."""
    from flwr.app import RecordDict

    from tests.flower_messages import server_message_to

    forged = "\n12:00:00 INFO fedpath.site: round 3: trained on 9 patients"

    def fails(message, _context):
        try:
            try:
                raise KeyError("inner" + forged + "z" * 10_000)
            except KeyError:
                raise ValueError("middle" + forged)  # noqa: B904 - raised while handling: __context__
        except ValueError as middle:
            outer = RuntimeError("outer")
            middle.__cause__ = outer  # a loop back to the top must not hang the log call
            raise outer from middle

    with caplog.at_level("ERROR", logger="fedpath.site"):
        reply = client.app.no_text_leaves(server_message_to(7, RecordDict(), "3"), None, fails)
    assert reply.error.code == 1013 and not reply.error.reason
    [logged] = [r.getMessage() for r in caplog.records if "could not handle" in r.getMessage()]
    assert "RuntimeError: outer" in logged and "ValueError: middle\\n12:00:00" in logged
    assert "KeyError: 'inner\\n12:00:00" not in logged  # the loop to outer ended the chain before the context
    assert logged.count("RuntimeError: outer") == 1 and logged.count("which came from") == 1
    assert not any(line.startswith("12:00:00") for line in logged.split("\n"))  # no forged line


def test_an_exception_chain_is_followed_through_context_and_cut_when_long():
    from shared.server_labels import CHAINED_EXCEPTIONS, exception_text

    def chain(depth):
        try:
            if depth == 0:
                raise RuntimeError("root\nforged" + "x" * 1_000)
            chain(depth - 1)
        except Exception as exc:
            if depth % 2:
                raise ValueError(f"level {depth}") from exc  # __cause__
            raise ValueError(f"level {depth}")  # noqa: B904 - __context__ only, as a library might

    try:
        chain(2)
    except ValueError as exc:
        text = exception_text(exc)
    assert [line.split(":")[0] for line in text.split("\n") if not line.startswith(" ")] == [
        "ValueError", "ValueError", "ValueError", "RuntimeError"]
    [root] = [line for line in text.split("\n") if line.startswith("RuntimeError")]
    assert root.startswith("RuntimeError: root\\nforged") and root.endswith("(1025 characters)")
    try:
        chain(CHAINED_EXCEPTIONS + 2)
    except ValueError as exc:
        text = exception_text(exc)
    assert text.count("which came from") == CHAINED_EXCEPTIONS - 1 and text.endswith("not shown)")
