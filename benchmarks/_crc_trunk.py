"""The consortium's trunk for the crc-tiles benchmarks: pretrained once on one part of the tiles, kept, reused.

``../shared/data/crc-tiles`` is split by tile (seeded, per class) into a disjoint evaluation part
of AC against T + V (folders ``adenocarcinoma`` and ``adenoma``, as many items of each) and a
pretraining part of the rest: of all five classes (``FULL``), or only of the two classes never
evaluated, healthy mucosa and serrated lesions (``UNSEEN``, the honest arm: the trunk has seen no
tile of either evaluated class). Both parts are symlinks (the handout data is never copied). ``pretrain_encoder`` trains
the InceptionV3 trunk on the first part, as a consortium would on public data before any
federated round; the benchmarks use the second part only. The split, the weights and their
metadata JSON live in ``$TMPDIR/fedpath-benchmarks/crc-trunk-<settings hash>/``, outside the
repository: the trunk is the starting point of these benchmarks, not what they measure, so it
is trained once per setting and reused (delete the folder to train it again). A helper, not a
benchmark: the leading underscore keeps it out of ``python -m benchmarks all``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from server.encoder_pretraining import (
    PretrainResult,
    PretrainSettings,
    attach_projection,
    metadata_path,
    pretrain_encoder,
)
from shared.encoder import weights_id

CRC_TILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "crc-tiles"
EVAL_CLASSES = {"adenocarcinoma": ("AC",), "adenoma": ("T", "V")}
WORK = Path(tempfile.gettempdir()) / "fedpath-benchmarks"


@dataclass(frozen=True)
class TrunkPlan:
    eval_per_class: int  # evaluation items of each class: this many AC tiles, and as many of T and V together
    pretrain_per_class: int | None  # tiles of each class, from the rest, to pretrain on; None: all of the rest
    settings: PretrainSettings
    split_seed: int = 0
    pretrain_classes: tuple[str, ...] | None = None  # class folders to pretrain on; None: all five

    def as_dict(self) -> dict:
        settings = {k: v for k, v in asdict(self.settings).items() if k not in ("num_workers", "device")}  # no effect
        return {"tiles": str(CRC_TILES), "eval_per_class": self.eval_per_class,
                "pretrain_per_class": self.pretrain_per_class, "split_seed": self.split_seed, "settings": settings,
                **({} if self.pretrain_classes is None else {"pretrain_classes": list(self.pretrain_classes)})}

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:12]


# Sized for 2 cores (27 tiles/s at 96 px on idle cores): the evaluation part is 1,200 AC tiles and
# 600 each of T and V (enough for 1,000 test items); FULL pretrains on all the other 5,600 tiles
# for 6 epochs, UNSEEN on the 3,200 of H and S for 4 (what the 2-core budget allowed: 40 % of the steps).
FULL = TrunkPlan(1200, None, PretrainSettings(tile_size=96, epochs=6, batch_size=32, val_fraction=0.1, mpp=None))
UNSEEN = TrunkPlan(1200, None, PretrainSettings(tile_size=96, epochs=4, batch_size=32, val_fraction=0.1, mpp=None),
                   pretrain_classes=("H", "S"))
QUICK = TrunkPlan(30, 24, PretrainSettings(tile_size=75, epochs=1, batch_size=32, val_fraction=0.1, mpp=None))


@dataclass(frozen=True)
class CrcTrunk:
    plan: TrunkPlan
    eval_dir: Path  # eval/<adenocarcinoma|adenoma>/<class folder>-<tile>: the only tiles a benchmark evaluates on
    weights: Path  # trunk state dict: features.backbone_weights
    sha256: str  # model.trunk_sha256
    record: dict  # the metadata JSON pretrain_encoder wrote
    reused: bool  # False: pretrained by this call

    def summary(self) -> dict:
        """What a benchmark's JSON records about the trunk it used."""
        record = self.record
        return {"trunk_sha256": self.sha256, "trunk_plan": self.plan.as_dict(),
                "trunk_folder": str(self.weights.parent), "trunk_reused": self.reused,
                "pretrain_tiles": record["train_tiles"] + record["val_tiles"], "pretrain_classes": record["classes"],
                "pretrain_validation": record["validation"], "pretrain_seconds": record["seconds_this_run"]}


def pretrained_trunk(plan: TrunkPlan, progress: bool = False) -> CrcTrunk:
    """The trunk of ``plan``: from its work folder when its weights match their metadata, else pretrained now."""
    folder = WORK / f"crc-trunk-{plan.key()}"
    weights = folder / "encoder.pth"
    record = _finished(weights)
    reused = record is not None
    if record is None:
        for part in ("pretrain", "eval"):  # links only (their targets are untouched); a cut-short split is redone
            shutil.rmtree(folder / part, ignore_errors=True)
        split_tiles(folder, plan.eval_per_class, plan.pretrain_per_class, plan.split_seed, plan.pretrain_classes)
        record = pretrain_encoder(folder / "pretrain", weights, plan.settings, progress=progress).record
    if "projection" not in record:  # a trunk pretrained before pretrain_encoder fitted the projection
        record = attach_projection(PretrainResult(weights, metadata_path(weights), record["sha256"], record),
                                   folder / "pretrain", plan.settings, progress=progress).record
    return CrcTrunk(plan, folder / "eval", weights, record["sha256"], record, reused)


def _finished(weights: Path) -> dict | None:
    """The metadata of finished weights whose file is the one it names by sha256; None otherwise."""
    try:
        record = json.loads(metadata_path(weights).read_text())
    except (OSError, ValueError):
        return None
    return record if weights.is_file() and record.get("sha256") == weights_id(weights) else None


def split_tiles(root: Path, eval_per_class: int, pretrain_per_class: int | None, seed: int = 0,
                pretrain_classes: tuple[str, ...] | None = None) -> None:
    """Symlinks: root/pretrain/<class folder>, root/eval/<adenocarcinoma|adenoma>; no tile in both.

    Each evaluation class holds ``eval_per_class`` tiles, shared evenly by its folders (T and V
    give half each, the first one any odd tile).
    """
    rng = np.random.default_rng(seed)
    eval_class = {folder: name for name, folders in EVAL_CLASSES.items() for folder in folders}
    held_count = {folder: eval_per_class // len(folders) + (i < eval_per_class % len(folders))
                  for folders in EVAL_CLASSES.values() for i, folder in enumerate(folders)}
    for class_dir in sorted(p for p in CRC_TILES.iterdir() if p.is_dir()):
        tiles = sorted(class_dir.iterdir())
        tiles = [tiles[i] for i in rng.permutation(len(tiles))]
        held = tiles[:held_count[class_dir.name]] if class_dir.name in eval_class else []
        rest = tiles[len(held):] if pretrain_classes is None or class_dir.name in pretrain_classes else []
        for tile in rest[:pretrain_per_class]:
            _link(root / "pretrain" / class_dir.name / tile.name, tile)
        for tile in held:
            _link(root / "eval" / eval_class[class_dir.name] / f"{class_dir.name}-{tile.name}", tile)


def _link(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)
