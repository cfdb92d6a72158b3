"""server.encoder_pretraining on a tiny generated tile set: weights and metadata, loadable, resumable, clear errors."""

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from server.cli import main as server_main
from server.encoder_pretraining import (
    PretrainError,
    PretrainSettings,
    augment,
    find_tiles,
    partial_path,
    pretrain_encoder,
)
from shared.encoder import TileEncoder, WeightsError
from shared.model import ModelConfig, build_head

SETTINGS = PretrainSettings(tile_size=75, epochs=1, batch_size=4, val_fraction=0.25, num_workers=0)


def make_tiles(root, classes=("pink", "purple"), per_class=6, size=80):
    """Flat-coloured noisy tiles, one folder per class (generated: no handout data needed)."""
    rng = np.random.default_rng(0)
    colours = {"pink": (230, 150, 190), "purple": (120, 70, 160), "white": (240, 240, 240)}
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colours[name]) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_pretraining_writes_loadable_weights_and_metadata(tmp_path):
    tiles = make_tiles(tmp_path / "tiles")
    out = tmp_path / "encoder.pth"
    result = pretrain_encoder(tiles, out, SETTINGS, progress=False)

    assert result.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["sha256"] == result.sha256 and meta["classes"] == ["pink", "purple"]
    assert meta["tile_size"] == 75 and meta["train_tiles"] + meta["val_tiles"] == 12 and meta["val_tiles"] == 4
    assert meta["settings"]["epochs"] == 1 and 0 <= meta["validation"]["accuracy"] <= 1
    assert meta["use"]["server.yaml"]["model"]["trunk_sha256"] == result.sha256
    assert not partial_path(out).exists()
    trained = TileEncoder(out)  # the site's loader takes the file as features.backbone_weights
    random_trunk = TileEncoder("random").trunk
    assert not torch.equal(trained.trunk.Conv2d_1a_3x3.conv.weight, random_trunk.Conv2d_1a_3x3.conv.weight)
    # the frozen projection is in the same file (so the pin covers it), and the head reads it from there
    assert meta["projection"]["size"] == 128 and meta["use"]["server.yaml"]["model"]["frozen_projection"] is True
    stored = torch.load(out, weights_only=True)
    head = build_head(ModelConfig(frozen_projection=True), 2, out)
    assert torch.equal(head.projection.weight, stored["projection.weight"])
    assert "projection.weight" not in head.state_dict()  # it never travels nor is checkpointed
    assert head(torch.randn(3, 1, 2048)).shape == (3, 2)


def test_a_frozen_projection_needs_a_trunk_that_has_one(tmp_path):
    tiles = make_tiles(tmp_path / "tiles")
    out = tmp_path / "encoder.pth"
    pretrain_encoder(tiles, out, SETTINGS, progress=False, projection=0)
    assert "projection.weight" not in torch.load(out, weights_only=True)
    with pytest.raises(WeightsError, match="holds no projection.*frozen_projection: false"):
        build_head(ModelConfig(frozen_projection=True), 2, out)
    with pytest.raises(RuntimeError, match="not loaded"):  # the server's shapes-only head refuses to run
        build_head(ModelConfig(frozen_projection=True), 2)(torch.randn(1, 1, 2048))
    assert [name for name in build_head(ModelConfig(frozen_projection=True), 2).state_dict()
            if name.startswith("projection")] == []


def interrupt_at_epoch_two(tiles, out, settings):
    """Ctrl-C as epoch 2 starts, as a user would: epoch 1's checkpoint is all that is left."""
    import server.encoder_pretraining as module

    original = module.tqdm

    def stop(iterable, desc, **kwargs):
        if desc.startswith("epoch 2/"):
            raise KeyboardInterrupt
        return original(iterable, desc=desc, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "tqdm", stop)
        with pytest.raises(KeyboardInterrupt):
            pretrain_encoder(tiles, out, settings, progress=False)
    return torch.load(partial_path(out), weights_only=True)


def test_an_interrupted_run_continues_from_its_checkpoint(tmp_path):
    tiles = make_tiles(tmp_path / "tiles")
    two_epochs = replace(SETTINGS, epochs=2)
    out = tmp_path / "encoder.pth"
    state = interrupt_at_epoch_two(tiles, out, two_epochs)
    assert state["epoch"] == 1 and not out.exists()
    with pytest.raises(PretrainError, match="other tiles or settings"):
        pretrain_encoder(tiles, out, replace(two_epochs, learning_rate=0.01), progress=False)

    resumed = pretrain_encoder(tiles, out, two_epochs, progress=False)
    assert [h["epoch"] for h in resumed.record["history"]] == [1, 2]
    assert resumed.record["history"][0] == state["history"][0]  # epoch 1 was not trained again
    assert not partial_path(out).exists()


def test_bad_tile_folders_are_refused_clearly(tmp_path):
    with pytest.raises(PretrainError, match="tile folder not found"):
        find_tiles(tmp_path / "nowhere")
    tiles = make_tiles(tmp_path / "tiles", classes=("pink",))
    with pytest.raises(PretrainError, match="at least two classes"):
        find_tiles(tiles)
    (tiles / "empty").mkdir()
    with pytest.raises(PretrainError, match="empty hold no image tiles"):
        find_tiles(tiles)


def test_augmentation_keeps_shape_and_stays_near_the_stain(tmp_path):
    tile = np.full((32, 32, 3), (200, 120, 170), dtype=np.uint8)
    tile[:8] = (90, 40, 140)  # a strip of nuclei: rotations and flips move it
    out = augment(tile, np.random.default_rng(1), 0.05)
    assert out.shape == tile.shape and out.dtype == np.uint8
    sorted_mean = [float(np.sort(image.reshape(-1, 3), axis=0).mean()) for image in (out, tile)]
    assert abs(sorted_mean[0] - sorted_mean[1]) < 20
    assert np.array_equal(augment(tile, np.random.default_rng(1), 0.05), out)  # seeded: a resumed run repeats it


def test_cli_pretrains_and_prints_the_hash(tmp_path, capsys):
    tiles = make_tiles(tmp_path / "tiles")
    out = tmp_path / "cli.pth"
    code = server_main(["pretrain-encoder", "--tiles", str(tiles), "--out", str(out), "--tile-size", "75",
                        "--epochs", "1", "--batch-size", "4", "--val-fraction", "0.25", "--workers", "0",
                        "--no-progress"])
    assert code == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() in capsys.readouterr().out
    assert server_main(["pretrain-encoder", "--tiles", str(tmp_path / "none"), "--out", str(out)]) == 2


def test_zero_epochs_keeps_the_starting_trunk_and_fits_only_the_projection(tmp_path):
    tiles = make_tiles(tmp_path / "tiles")
    out = tmp_path / "encoder.pth"
    result = pretrain_encoder(tiles, out, replace(SETTINGS, epochs=0), progress=False)
    stored = torch.load(out, weights_only=True)
    assert torch.equal(stored["Conv2d_1a_3x3.conv.weight"], TileEncoder("random").trunk.Conv2d_1a_3x3.conv.weight)
    assert result.record["validation"] is None and result.record["projection"]["validation"]["accuracy"] >= 0.75
