"""Does a trunk pretrained on public tiles beat a random one? Adenocarcinoma against adenoma, frozen trunk.

``../shared/data/crc-tiles`` is split by tile (seeded, per class) into a pretraining part of all
five classes and a disjoint evaluation part of AC, T and V (``benchmarks/_crc_trunk.py``, which
keeps the trunk ``pretrain_encoder`` trains on the first part for later runs); then, for the
random and the pretrained trunk alike, the site's own code (``prepare_site`` with the trunk as
``backbone_weights``, ``train_round``, ``evaluate``) trains the same head with the same budget
on 80 % of the evaluation part and scores the other 20 %. Each tile is one sample (sequence
length 1, ``mean`` core: a small MLP on the 2048-d vector).
The data has no patient ids, so tiles of one patient may sit on both sides of a split.
The ``unseen`` arms use the trunk pretrained only on H and S, classes never evaluated (``UNSEEN``):
the honest figure for a trunk pretrained on other tissue than the task's.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from benchmarks._crc_trunk import CRC_TILES, EVAL_CLASSES, FULL, QUICK, UNSEEN, pretrained_trunk
from client.feature_cache import FeatureCache
from client.prepare import prepare_site
from client.private_training import train_round
from client.sequence_data import PatientSequences, load_split
from client.site_config import load_site_config
from client.train_local import evaluate
from shared.model import build_head

GOAL_ACC_PRETRAINED = 0.85  # the pretrained trunk's frozen-head accuracy on the evaluation classes


def head_accuracy(root: Path, eval_dir: Path, weights: str, tile_size: int, epochs: int, dp: bool) -> dict:
    """The site's path: prepare with this trunk, train the head (DP at ε = 8 or off), score held-out tiles."""
    config = {"name": "crc", "data": {"tile_folder": str(eval_dir), "labels": list(EVAL_CLASSES), "val_fraction": 0.2},
              "tiling": {"tile_size": tile_size}, "model": {"core": "mean"}, "sequences": {"length": 1},
              "features": {"backbone_weights": weights, "batch_size": 64, "num_workers": 1}}
    (root / "site.yaml").write_text(yaml.safe_dump(config))
    site = load_site_config(root / "site.yaml")
    prepare_site(site, progress=False)
    cache = FeatureCache(site.features.cache_dir)
    train, classes = load_split(cache, "train")
    val, _ = load_split(cache, "val")
    torch.manual_seed(0)
    head = build_head(site.model, len(classes), weights)
    privacy = replace(site.privacy, enabled=dp, epsilon=8.0)
    training = replace(site.training, epochs=epochs, batch_size=64 if dp else 32)
    ledger = root / f"ledger-{hashlib.sha256(weights.encode()).hexdigest()[:12]}-{dp}.json"  # one per trunk and arm
    result = train_round(head, PatientSequences(train, 1), training, privacy, ledger, "1", progress=False)
    metrics = evaluate(head, val, classes, 1, "adenocarcinoma")
    return {"accuracy": round(float(metrics["accuracy"]), 4), "auc": round(float(metrics["auc"]), 4),
            "epsilon": None if result.epsilon is None else round(result.epsilon, 3),
            "train_tiles": len(train), "test_tiles": len(val)}


def run(quick: bool) -> dict:
    if not CRC_TILES.is_dir():
        return {"skipped": f"data folder absent: {CRC_TILES}"}
    logging.getLogger("fedpath.site").setLevel(logging.ERROR)
    trunk = pretrained_trunk(QUICK if quick else FULL)
    # --quick pretrains no second trunk: no "unseen" arm, rather than the seen trunk under that name
    unseen = None if quick else pretrained_trunk(UNSEEN)  # same evaluation tiles (same split seed)
    settings = trunk.plan.settings
    head_epochs = 5 if quick else 30
    counts = [len(list((trunk.eval_dir / name).iterdir())) for name in EVAL_CLASSES]
    trunks = (("random", "random"), ("pretrained", str(trunk.weights)),
              *((("unseen", str(unseen.weights)),) if unseen is not None else ()))
    with tempfile.TemporaryDirectory() as tmp:
        arms = {f"{name}{'_dp' if dp else ''}": head_accuracy(Path(tmp), trunk.eval_dir, weights, settings.tile_size,
                                                              head_epochs, dp)
                for dp in (False, True) for name, weights in trunks}
    return {**{f"acc_{name}": arm["accuracy"] for name, arm in arms.items()},
            "goal_acc_pretrained": GOAL_ACC_PRETRAINED,
            "goal_acc_pretrained_met": arms["pretrained"]["accuracy"] >= GOAL_ACC_PRETRAINED,
            "majority_baseline": round(max(counts) / sum(counts), 4),
            "tile_size": settings.tile_size, "pretrain_epochs": settings.epochs, "head_epochs": head_epochs,
            **trunk.summary(), "unseen_trunk": None if unseen is None else unseen.summary(), "arms": arms}
