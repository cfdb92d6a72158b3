"""`trainable: last_block`: the folded block keeps the trunk's features, per-sample gradients are per
slide, the block-input cache is reused and invalidated, and a federated round trains block + head."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from client import federated_round
from client.feature_cache import FeatureCache
from client.features import half_if_it_fits
from client.prepare import feature_settings, prepare_site
from client.site_config import load_site_config
from client.train_local import train_local
from shared.encoder import LAST_BLOCK, TileEncoder, weights_id
from shared.model import FoldedBlock, ModelConfig, build_trainable
from shared.parameters import model_arrays
from shared.round_plan import PrivacyTarget, RoundPlan
from shared.round_sums import CountLayout, decode_sum
from simulations.slide_generator import SlideSpec, make_site_slides
from tests.conftest import write_site_yaml

MODEL = ModelConfig(projection=8, hidden=4, trainable="last_block", trunk_sha256=weights_id("random"))


def test_folded_block_keeps_the_trunks_features():
    torch.manual_seed(0)
    block = getattr(TileEncoder("random").trunk, LAST_BLOCK)
    with torch.no_grad():  # pretrained-like BatchNorm statistics, so the folding has something to fold
        for bn in (m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
        maps = torch.randn(3, 2048, 3, 3)
        expected, folded = block(maps), FoldedBlock.from_trunk_block(block).feature_map(maps)
    # torch.nn.utils.fusion folds in float32: within float rounding of the unfolded block (measured 5e-7).
    assert torch.allclose(folded, expected, rtol=0, atol=2e-6 * float(expected.abs().max()))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in FoldedBlock().modules())


def test_per_sample_gradients_are_per_slide():
    torch.manual_seed(0)
    model = build_trainable(ModelConfig(projection=8, hidden=4, trainable="last_block"), 2, "random")
    hooked = GradSampleModule(model, loss_reduction="sum")
    slides, labels = torch.randn(3, 4, 2048, 1, 1).half(), torch.tensor([0, 1, 0])  # 3 slides x 4 tiles

    def per_sample(inputs):
        for p in model.parameters():
            p.grad_sample, p.grad = None, None
        torch.nn.functional.cross_entropy(hooked(inputs), labels, reduction="sum").backward()
        return {name: p.grad_sample.clone() for name, p in model.named_parameters()}

    first = per_sample(slides)
    assert all(g.shape[0] == 3 for g in first.values())  # one gradient per sequence, not per tile (12)
    alone = torch.autograd.grad(torch.nn.functional.cross_entropy(model(slides[1:2]), labels[1:2], reduction="sum"),
                                model.block.branch1x1_weight)[0]
    torch.testing.assert_close(first["block.branch1x1_weight"][1], alone, rtol=1e-4, atol=1e-7)

    changed = slides.clone()
    changed[1, 2] = torch.randn(2048, 1, 1).half()  # one tile of slide 1
    second = per_sample(changed)
    for name in first:
        assert torch.equal(first[name][0], second[name][0]) and torch.equal(first[name][2], second[name][2])
    assert not torch.equal(first["block.branch1x1_weight"][1], second["block.branch1x1_weight"][1])


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One generated hospital prepared for last-block training (a dozen 96-px tiles, random trunk)."""
    root = tmp_path_factory.mktemp("last-block")
    [manifest] = make_site_slides(root, sites=1, slides_per_site=4, seed=7, spec=SlideSpec(width=1024, height=1024))
    path = write_site_yaml(manifest.parent, {"manifest": "manifest.csv", "val_fraction": 0.25},
                           tiling={"target_mpp": 2.0}, model={"trainable": "last_block", "projection": 8, "hidden": 4},
                           training={"epochs": 1, "batch_size": 2}, privacy={"epsilon": 8.0})
    first = prepare_site(load_site_config(path), progress=False)
    assert first.count("new") == 4 and first.new_tiles > 0
    return path


def test_block_input_cache_is_reused_and_invalidated(site, tmp_path):
    config = load_site_config(site)
    cache = FeatureCache(config.features.cache_dir)
    index = cache.read_index()
    entry = cache.load(next(iter(index.items.values()))["key"])
    assert entry.features.shape[1:] == (2048, 1, 1)  # the map entering the block; 96 px: 1x1
    # an untrained trunk's activations overflow float16; a pretrained trunk's maps are stored as float16
    assert entry.features.dtype == (np.float16 if np.abs(entry.features).max() < 65504 else np.float32)
    assert half_if_it_fits(np.ones((1, 2048, 1, 1), np.float32)).dtype == np.float16
    assert half_if_it_fits(np.full((1, 2048, 1, 1), 1e11, np.float32)).dtype == np.float32

    again = prepare_site(config, progress=False)
    assert again.count("cached") == 4 and again.new_tiles == 0

    head_only = replace(config, model=replace(config.model, trainable="head"))
    assert feature_settings(head_only) != feature_settings(config)  # vectors are another cache entry

    trunk = TileEncoder("random").trunk
    with torch.no_grad():
        trunk.Mixed_7b.branch1x1.conv.weight.mul_(1.5)
    torch.save(trunk.state_dict(), tmp_path / "new-trunk.pth")
    new_trunk = replace(config, features=replace(config.features, backbone_weights=str(tmp_path / "new-trunk.pth")))
    recomputed = prepare_site(new_trunk, progress=False)
    assert recomputed.count("new") == 4 and recomputed.new_tiles == again.tiles
    prepare_site(config, progress=False)  # back to the random trunk for the tests below: all cached


def test_a_federated_round_trains_block_and_head_under_dp(site):
    config = load_site_config(site)
    plan = RoundPlan(federation_id="last-block", classes=("adenocarcinoma", "adenoma"), model=MODEL,
                     sequence_length=2, batch_size=2, learning_rate=1e-3, privacy=PrivacyTarget(epsilon=8.0),
                     max_update_norm=100.0)  # Adam moves each of the block's 6M weights: larger norms than a head
    torch.manual_seed(0)
    received = list(model_arrays(build_trainable(MODEL, 2, "random")).values())
    reply = federated_round.fit(config, plan, received)
    assert reply.metrics["refused"] == 0 and 0 < reply.metrics["epsilon"] <= 8.0 + 1e-6
    names = list(model_arrays(build_trainable(MODEL, 2)))
    assert len(received) == len(names) and names[0].startswith("block.")
    read = decode_sum(reply.arrays, CountLayout(2, plan.evaluation_bins, 1), plan.weight_scale,
                      [a.shape for a in received])
    assert read.patients == pytest.approx(2, abs=1e-3)
    assert np.abs(read.update[0]).max() > 0  # the block moved, not only the head

    vectors_plan = replace(plan, model=replace(MODEL, trainable="head"))  # a head plan needs the vector cache
    refused = federated_round.fit(config, vectors_plan, list(model_arrays(build_trainable(vectors_plan.model, 2))
                                                               .values()))
    assert refused.metrics["refused"] == 5


def test_train_local_trains_the_last_block(site):
    run = train_local(load_site_config(site), progress=False)
    assert run.record["model"]["trainable"] == "last_block" and run.epsilon is not None
    saved = torch.load(run.folder / "model.pt", weights_only=True)
    assert any(name.startswith("block.") for name in saved["state_dict"])
