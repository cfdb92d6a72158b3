"""One trunk for everyone: model.trunk_sha256 travels in the round plan, a site with another or no
weights file refuses (code 7) naming the file and the hash, and the model card records the hash."""

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from client import federated_round
from client.prepare import prepare_site
from client.site_config import load_site_config
from server.app import initial_model, round_plan
from server.run_folder import RunFolder
from server.run_recorder import RunRecorder
from server.server_config import load_server_config
from shared.checkpoints import load_checkpoint
from shared.encoder import TileEncoder, TrunkMismatch, check_pinned, weights_id
from shared.model import ModelConfig, build_head
from shared.parameters import model_arrays
from shared.refusals import REFUSALS
from shared.round_plan import PrivacyTarget, RoundPlan
from shared.yaml_config import ConfigError
from simulations.slide_generator import SlideSpec, make_site_slides
from tests.conftest import disclosed_site, record_round, write_site_yaml

CLASSES = ("adenocarcinoma", "adenoma")


@pytest.fixture(scope="module")
def trunk_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("trunk") / "consortium-trunk.pth"
    torch.save(TileEncoder("random").trunk.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory, trunk_file):
    """One generated hospital prepared with the consortium's trunk file (a dozen 96-px tiles)."""
    root = tmp_path_factory.mktemp("pinned-site")
    [manifest] = make_site_slides(root, sites=1, slides_per_site=4, seed=7, spec=SlideSpec(width=1024, height=1024))
    path = write_site_yaml(manifest.parent, {"manifest": "manifest.csv", "val_fraction": 0.25},
                           tiling={"target_mpp": 2.0}, features={"backbone_weights": str(trunk_file)})
    prepare_site(load_site_config(path), progress=False)
    return path


def _plan(pin: str | None) -> RoundPlan:
    return RoundPlan(federation_id="pinned", classes=CLASSES, sequence_length=2, batch_size=2,
                     model=ModelConfig(projection=8, hidden=4, trunk_sha256=pin), privacy=PrivacyTarget(epsilon=8.0))


def _received(plan: RoundPlan) -> list[np.ndarray]:
    torch.manual_seed(0)
    return list(model_arrays(build_head(plan.model, len(plan.classes))).values())


def test_the_pinned_trunk_trains(site, trunk_file):
    plan = _plan(weights_id(trunk_file))
    reply = federated_round.fit(load_site_config(site), plan, _received(plan))
    assert reply.metrics["refused"] == 0 and reply.examples > 0


def test_another_or_a_missing_trunk_file_is_refused_naming_file_and_hash(site, trunk_file, tmp_path, caplog):
    expected = weights_id(trunk_file)
    other = tmp_path / "other.pth"
    other.write_bytes(trunk_file.read_bytes() + b"\0")
    with pytest.raises(TrunkMismatch) as error:
        check_pinned(other, expected)
    assert str(other) in str(error.value) and expected in str(error.value)
    with pytest.raises(TrunkMismatch, match=f"not found.*{expected}"):
        check_pinned(tmp_path / "missing.pth", expected)
    assert check_pinned("random", None) == weights_id("random")  # nothing pinned: demos keep working

    config = load_site_config(site)
    plan = _plan(expected)
    for weights in (other, tmp_path / "missing.pth"):
        moved = replace(config, features=replace(config.features, backbone_weights=str(weights)))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fedpath.site"):
            reply = federated_round.fit(moved, plan, _received(plan))
        assert reply.metrics["refused"] == 7 and not any(a.any() for a in reply.arrays)  # not scored either
        assert str(weights) in caplog.text and expected in caplog.text
    assert "pinned" in REFUSALS[7] and all(REFUSALS[code] for code in range(1, 7))


def test_the_server_checks_its_own_trunk_and_the_card_records_the_hash(tmp_path, trunk_file):
    pin = weights_id(trunk_file)
    text = (f"classes: [adenoma, adenocarcinoma]\nmodel:\n  projection: 8\n  hidden: 4\n  trainable: last_block\n"
            f"  trunk_sha256: {pin}\ntrunk_weights: {trunk_file}\nsecure_aggregation:\n  enabled: false\n")
    path = tmp_path / "server.yaml"
    path.write_text(text.replace(pin, "a" * 64))
    with pytest.raises(ConfigError, match="trunk_weights.*" + "a" * 64):
        load_server_config(path)
    path.write_text(text.replace(f"  trunk_sha256: {pin}\n", ""))
    with pytest.raises(ConfigError, match="needs model.trunk_sha256"):
        load_server_config(path)
    path.write_text(text.replace(pin, "not-a-hash"))
    with pytest.raises(ConfigError, match="64 lowercase hex"):
        load_server_config(path)

    path.write_text(text)
    folder = RunFolder.create(path)
    config = folder.config()
    assert round_plan(config, folder.federation_id, 1).model.trunk_sha256 == pin
    initial = initial_model(config)
    recorder = RunRecorder(folder, config, list(initial))
    record_round(recorder, 1, initial.values(), {"a": disclosed_site(1.0)})
    card = load_checkpoint(folder.path / "checkpoints" / "round-0001.npz").card
    assert card["trunk_sha256"] == pin and card["model"]["trunk_sha256"] == pin
    assert any(name.startswith("block.") for name in initial)  # last_block: the block travels with the head
