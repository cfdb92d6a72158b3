"""The reference study's comparison on real colorectal tiles: InceptionV3 alone, + simple RNN, + LSTM.

Adenocarcinoma (AC) against adenoma (T + V) from ``../shared/data/crc-tiles``, a fixed stratified
80/20 split by tile (the data has no patient ids), each tile read as its 8x8 InceptionV3 map
(64 positions: the study's layout, ``model.mode: grid``), each variant trained the same way
with and without DP (ε = 8). The study reached 0.863 / 0.864 / 0.862 validation accuracy.

The trunk is randomly initialised: pretrained weights cannot be downloaded here. That, not the
head, is what separates these figures from the study's (see issue on encoder pretraining).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from client.feature_cache import FeatureCache
from client.prepare import prepare_site
from client.private_training import train_round
from client.sequence_data import PatientSequences, load_split
from client.site_config import load_site_config
from client.train_local import evaluate
from shared.model import ModelConfig, build_head

CRC_TILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "crc-tiles"
CLASSES = {"adenocarcinoma": ("AC",), "adenoma": ("T", "V")}
REFERENCE = {"mean": 0.863, "rnn": 0.864, "lstm": 0.862}


def _link_dataset(root: Path, per_folder: int | None) -> Path:
    """The two-class view of the tiles as symlinks (the handout data is never copied)."""
    for name, folders in CLASSES.items():
        (root / name).mkdir(parents=True)
        for folder in folders:
            tiles = sorted((CRC_TILES / folder).iterdir())[:per_folder]
            for tile in tiles:
                (root / name / f"{folder}-{tile.name}").symlink_to(tile)
    return root


def _evaluate(head, slides, classes) -> dict:
    metrics = evaluate(head, slides, classes, length=64, positive_class="adenocarcinoma")
    return {k: round(float(metrics[k]), 4) for k in ("accuracy", "loss", "auc", "sensitivity", "specificity")}


def run(quick: bool) -> dict:
    if not CRC_TILES.is_dir():
        return {"skipped": f"data folder absent: {CRC_TILES}"}
    logging.getLogger("fedpath.site").setLevel(logging.ERROR)
    per_folder, tile_size, epochs = (40, 149, 2) if quick else (None, 299, 12)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _link_dataset(root / "tiles", per_folder)
        config = {"name": "crc", "data": {"tile_folder": "tiles", "labels": list(CLASSES), "val_fraction": 0.2},
                  "tiling": {"tile_size": tile_size}, "model": {"mode": "grid"},
                  "features": {"batch_size": 32, "num_workers": 1}}
        (root / "site.yaml").write_text(yaml.safe_dump(config))
        site = load_site_config(root / "site.yaml")
        prepared = prepare_site(site, progress=False)
        cache = FeatureCache(site.features.cache_dir)
        train, classes = load_split(cache, "train")
        val, _ = load_split(cache, "val")
        results = {}
        for core in ("mean", "rnn", "lstm"):
            for dp in (False, True):
                torch.manual_seed(0)
                head = build_head(ModelConfig(core=core, mode="grid"), len(classes))
                privacy = replace(site.privacy, enabled=dp, epsilon=8.0)
                training = replace(site.training, epochs=epochs, batch_size=64 if dp else 32)
                round_ = train_round(head, PatientSequences(train, 64), training, privacy,
                                     root / f"ledger-{core}.json", "1", progress=False)
                results[f"{core}{'_dp' if dp else ''}"] = {
                    "train": _evaluate(head, train, classes), "val": _evaluate(head, val, classes),
                    "epsilon": None if round_.epsilon is None else round(round_.epsilon, 3),
                    "noise_multiplier": round_.noise_multiplier}
    gaps = {name: round(results[name]["val"]["accuracy"] - REFERENCE[name.split("_")[0]], 4) for name in results}
    return {"tile_size": tile_size, "epochs": epochs, "positions": 64 if tile_size == 299 else "h*w",
            "train_tiles": len(train), "val_tiles": len(val), "trunk": "random (no pretrained weights offline)",
            "feature_seconds": round(prepared.seconds, 1), "reference_val_accuracy": REFERENCE,
            "val_accuracy_minus_reference": gaps, "variants": results}
