"""Bring your own trunk: ``features.backbone: timm:NAME`` (``shared/timm_encoder.py``) through prepare, a
federated round and predict, with timm's small ``test_vit`` at random initialisation saved as a local weights
file and pinned by sha256, as a hospital would use a self-supervised ViT's weights."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import yaml

from client import federated_round
from client.cli import main as site_main
from client.feature_cache import FeatureCache
from client.prepare import prepare_site
from client.site_config import load_site_config
from shared.checkpoints import save_checkpoint
from shared.encoder import TrunkMismatch, WeightsError, build_encoder, feature_dim
from shared.model import ModelConfig, build_head
from shared.parameters import model_arrays
from shared.round_plan import PrivacyTarget, RoundPlan
from shared.round_sums import CountLayout, decode_sum
from shared.yaml_config import ConfigError
from simulations.slide_generator import SlideSpec, make_site_slides
from tests.conftest import write_site_yaml

BACKBONE = "timm:test_vit"  # a 0.3 M-parameter ViT timm keeps for tests: 64-d features, 160-px input
CLASSES = ("adenocarcinoma", "adenoma")


@pytest.fixture(scope="module")
def trunk(tmp_path_factory):
    """The ViT's weights as a local file, and its sha256 (what model.trunk_sha256 pins)."""
    path = tmp_path_factory.mktemp("trunk") / "vit.pth"
    torch.manual_seed(3)
    encoder = build_encoder(BACKBONE)
    for parameter in encoder.trunk.parameters():  # not the seeded default: the file must be what is used
        parameter.data.add_(0.01 * torch.randn_like(parameter))
    torch.save({"state_dict": encoder.trunk.state_dict()}, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def site(trunk, tmp_path_factory):
    """One generated hospital prepared with the ViT (2 train, 2 val slides)."""
    path, sha256 = trunk
    [manifest] = make_site_slides(tmp_path_factory.mktemp("timm-site"), sites=1, slides_per_site=4, seed=5,
                                  spec=SlideSpec(width=1024, height=1024))
    site_yaml = write_site_yaml(manifest.parent, {"manifest": "manifest.csv", "val_fraction": 0.25},
                                features={"backbone": BACKBONE, "backbone_weights": str(path)},
                                model={"projection": 16, "hidden": 8, "trunk_sha256": sha256})
    config = load_site_config(site_yaml)
    summary = prepare_site(config, progress=False)
    assert summary.count("new") == 4
    return site_yaml, config


def test_the_trunk_states_its_size_and_preprocessing(trunk):
    path, _ = trunk
    encoder = build_encoder(BACKBONE, path)
    assert encoder.feature_dim == feature_dim(BACKBONE) == 64  # read from the model, built on the meta device
    assert encoder.input_size == (160, 160)  # timm's data config, not ours
    assert encoder.mean.flatten().tolist() == pytest.approx([127.5] * 3)
    tiles = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)
    with torch.inference_mode():
        vectors = encoder(tiles)
        assert vectors.shape == (3, 64)
        assert not torch.allclose(vectors, build_encoder(BACKBONE)(tiles))  # the file's weights, not the seed's
    with pytest.raises(WeightsError, match="does not hold timm test_resnet weights"):
        build_encoder("timm:test_resnet", path)
    with pytest.raises(WeightsError, match="Unknown model"):
        build_encoder("timm:no_such_model")
    with pytest.raises(ValueError, match="need the inception_v3 backbone"):
        ModelConfig(backbone=BACKBONE, mode="grid")
    with pytest.raises(ValueError, match="need the inception_v3 backbone"):
        ModelConfig(backbone=BACKBONE, trainable="last_block")


def test_site_yaml_names_the_backbone_once(tmp_path):
    write_site_yaml(tmp_path, {"manifest": "m.csv"}, features={"backbone": "vit_small"})
    with pytest.raises(ConfigError, match=r"site.yaml:\d+: features.backbone: must be inception_v3 or timm:NAME"):
        load_site_config(tmp_path / "site.yaml")
    write_site_yaml(tmp_path, {"manifest": "m.csv"}, features={"backbone": BACKBONE}, model={"mode": "grid"})
    with pytest.raises(ConfigError, match="model.mode: grid need the inception_v3 backbone"):
        load_site_config(tmp_path / "site.yaml")


def test_prepare_caches_the_trunks_vectors_pinned_by_sha256(site, trunk):
    _, config = site
    _, sha256 = trunk
    cache = FeatureCache(config.features.cache_dir)
    index = cache.read_index()
    assert index.backbone == sha256 and index.settings["backbone"] == BACKBONE
    for item in index.items.values():
        assert cache.load(item["key"]).features.shape == (item["tiles"], 64)
    # another file under the same pin is refused before any slide is read
    other = load_site_config(site[0])
    document = yaml.safe_load(site[0].read_text())
    document["model"]["trunk_sha256"] = "0" * 64
    site[0].with_name("pinned-elsewhere.yaml").write_text(yaml.safe_dump(document))
    with pytest.raises(TrunkMismatch, match="model.trunk_sha256"):
        prepare_site(load_site_config(site[0].with_name("pinned-elsewhere.yaml")), progress=False)
    assert other.model.backbone == BACKBONE  # features.backbone set the site's model


def _plan(sha256: str, backbone: str = BACKBONE) -> RoundPlan:
    return RoundPlan(federation_id="fed-timm", round=1, planned_rounds=2, classes=CLASSES,
                     model=ModelConfig(projection=16, hidden=8, backbone=backbone, trunk_sha256=sha256),
                     sequence_length=2, epochs=1, batch_size=2, learning_rate=0.01,
                     privacy=PrivacyTarget(required=True, epsilon=8.0, delta=1e-5), evaluations=3, weight_scale=50)


def test_a_federated_round_trains_the_head_on_the_trunks_vectors(site, trunk, tmp_path):
    site_yaml, config = site
    _, sha256 = trunk
    plan = _plan(sha256)
    torch.manual_seed(0)
    received = list(model_arrays(build_head(plan.model, len(CLASSES))).values())
    assert received[0].shape == (16, 64)  # the projection reads the ViT's 64-d vectors
    reply = federated_round.fit(config, plan, received)
    assert reply.metrics["refused"] == 0 and 0 < reply.metrics["epsilon"] <= 8.0 * (1 + 1e-6)
    read = decode_sum(reply.arrays, CountLayout(2, plan.evaluation_bins, 1), plan.weight_scale,
                      [a.shape for a in received])
    assert any(np.abs(u).max() > 0 for u in read.update)
    # a federation whose model reads InceptionV3 vectors: this site sits out, saying why (code 5)
    inception = _plan(None, backbone="inception_v3")
    torch.manual_seed(0)
    received = list(model_arrays(build_head(inception.model, len(CLASSES))).values())
    assert federated_round.fit(config, inception, received).metrics["refused"] == 5


def test_predict_reads_slides_through_the_same_trunk(site, trunk, tmp_path, capsys):
    site_yaml, config = site
    _, sha256 = trunk
    model = ModelConfig(projection=16, hidden=8, backbone=BACKBONE, trunk_sha256=sha256)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "run", 1, model_arrays(build_head(model, 2)),
                    {"model": model.as_dict(), "classes": list(CLASSES), "sequence_length": 4,
                     "trunk_sha256": sha256}, best=False)
    checkpoint = tmp_path / "run" / "checkpoints" / "latest.npz"
    slides = sorted(config.data.manifest.parent.glob("slides/*.tif"))[:2]
    fresh = yaml.safe_load(site_yaml.read_text())
    fresh["features"]["cache_dir"] = str(tmp_path / "empty-cache")  # computed, not read from prepare's cache
    (tmp_path / "fresh.yaml").write_text(yaml.safe_dump(fresh))
    for name, site_config in (("cached", site_yaml), ("computed", tmp_path / "fresh.yaml")):
        assert site_main(["predict", *map(str, slides), "--model", str(checkpoint), "--out", str(tmp_path / name),
                          "--config", str(site_config), "--no-progress"]) == 0
    for slide in slides:
        cached, computed = (json.loads((tmp_path / name / f"{slide.stem}.json").read_text())
                            for name in ("cached", "computed"))
        assert cached["features"] == "cache" and computed["features"] == "computed"
        for label in CLASSES:
            assert computed["probabilities"][label] == pytest.approx(cached["probabilities"][label], abs=1e-4)
    # a site whose trunk is InceptionV3 cannot score this model's slides
    inception = yaml.safe_load(site_yaml.read_text())
    inception["features"] = {"cache_dir": str(tmp_path / "other-cache")}
    inception["model"] = {"projection": 16, "hidden": 8}
    (tmp_path / "inception.yaml").write_text(yaml.safe_dump(inception))
    capsys.readouterr()
    assert site_main(["predict", str(slides[0]), "--model", str(checkpoint), "--out", str(tmp_path / "refused"),
                      "--config", str(tmp_path / "inception.yaml"), "--no-progress"]) == 2
    assert "reads vectors of the timm:test_vit backbone" in capsys.readouterr().err
