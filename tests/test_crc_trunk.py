"""benchmarks._crc_trunk: disjoint pretraining/evaluation parts of crc-tiles, and a trunk trained once and reused."""

import json
from pathlib import Path

import pytest

from benchmarks import _crc_trunk as crc_trunk
from server.encoder_pretraining import PretrainSettings, metadata_path

HANDOUT = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (HANDOUT / "crc-tiles").is_dir(), reason=f"{HANDOUT}/crc-tiles absent")


def _targets(folder: Path) -> set[Path]:
    return {link.resolve() for link in folder.rglob("*") if link.is_symlink()}


def test_split_keeps_the_evaluation_tiles_out_of_pretraining(tmp_path):
    crc_trunk.split_tiles(tmp_path, eval_per_class=5, pretrain_per_class=3)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["adenocarcinoma", "adenoma"]
    assert len(list((tmp_path / "eval" / "adenocarcinoma").iterdir())) == 5
    adenoma = sorted(p.name.split("-")[0] for p in (tmp_path / "eval" / "adenoma").iterdir())
    assert adenoma == ["T"] * 3 + ["V"] * 2  # as many items as AC, T and V sharing them
    assert {p.name: len(list(p.iterdir())) for p in (tmp_path / "pretrain").iterdir()} == {
        name: 3 for name in ("AC", "H", "S", "T", "V")}
    assert _targets(tmp_path / "eval").isdisjoint(_targets(tmp_path / "pretrain"))


def test_unseen_split_pretrains_only_on_classes_never_evaluated(tmp_path):
    crc_trunk.split_tiles(tmp_path / "unseen", eval_per_class=4, pretrain_per_class=None, pretrain_classes=("H", "S"))
    crc_trunk.split_tiles(tmp_path / "full", eval_per_class=4, pretrain_per_class=None)
    assert sorted(p.name for p in (tmp_path / "unseen" / "pretrain").iterdir()) == ["H", "S"]
    assert len(list((tmp_path / "unseen" / "pretrain" / "H").iterdir())) == 1600  # all of them
    # the same seed holds out the same evaluation tiles whatever is pretrained on: arms compare on one test set
    assert _targets(tmp_path / "unseen" / "eval") == _targets(tmp_path / "full" / "eval")
    assert crc_trunk.UNSEEN.key() != crc_trunk.FULL.key()


def test_trunk_is_reused_only_while_its_weights_are_the_file_its_metadata_names(tmp_path, monkeypatch):
    """The work folder as a finished ``pretrain_encoder`` leaves it (weights, metadata JSON naming
    their sha256) is reused; changed weights are not (pretraining itself: tests/test_encoder_pretraining.py)."""
    monkeypatch.setattr(crc_trunk, "WORK", tmp_path)
    plan = crc_trunk.TrunkPlan(2, 4, PretrainSettings(tile_size=75, epochs=1, batch_size=4, val_fraction=0.25))
    weights = tmp_path / f"crc-trunk-{plan.key()}" / "encoder.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"trunk state dict")
    record = {"sha256": crc_trunk.weights_id(weights), "classes": ["AC", "H", "S", "T", "V"], "train_tiles": 15,
              "val_tiles": 5, "validation": {"accuracy": 0.4}, "seconds_this_run": 1.0,
              "projection": {"size": 128}}  # as pretrain_encoder finishes it (else the projection is fitted now)
    metadata_path(weights).write_text(json.dumps(record))
    trunk = crc_trunk.pretrained_trunk(plan)
    assert trunk.reused and trunk.sha256 == record["sha256"] and trunk.eval_dir == weights.parent / "eval"
    assert trunk.summary()["pretrain_tiles"] == 20 and trunk.summary()["trunk_plan"]["eval_per_class"] == 2
    weights.write_bytes(b"another trunk")
    assert crc_trunk._finished(weights) is None  # pretrained_trunk would train afresh
    assert crc_trunk.TrunkPlan(3, 4, plan.settings).key() != plan.key()
