"""`fedpath-site train-local`: one site's data alone, the baseline a federation is compared with.

Reads the feature cache made by `prepare`, trains the head, or the trunk's last block and the head
(``model.trainable``), DP as configured, evaluates on the
validation split after every epoch, and writes a run folder: ``model.pt`` (trained weights, model
config, classes), ``metrics.json`` (per-epoch curve, final metrics, ε) and its own privacy ledger:
every run releases a model, so its ε counts on top of earlier runs on the same slides.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from client.feature_cache import FeatureCache
from client.prepare import feature_settings
from client.private_training import train_round
from client.sequence_data import PatientSequences, load_split, predict_slides
from client.site_config import SiteConfig
from shared.atomic_files import atomic_write, atomic_write_json
from shared.devices import resolve_device, use_threads
from shared.encoder import check_pinned
from shared.errors import UserError
from shared.metrics import classification_metrics, format_metric, to_jsonable
from shared.model import build_trainable
from shared.run_dirs import new_run_dir

log = logging.getLogger("fedpath.site")


@dataclass(frozen=True)
class LocalRun:
    folder: Path  # model.pt, metrics.json, privacy_ledger.json
    record: dict  # what metrics.json holds

    @property
    def val_accuracy(self) -> float | None:
        return self.record["final"]["val"].get("accuracy")

    @property
    def epsilon(self) -> float | None:
        return self.record["round"]["epsilon"]


def evaluate(head, slides, classes, length: int, positive_class: str | None) -> dict:
    if not slides:
        return {}
    probs = predict_slides(head, slides, length)
    return classification_metrics(np.array([s.label for s in slides]), probs, classes, positive_class)


def train_local(config: SiteConfig, progress: bool = True) -> LocalRun:
    """Train on this site alone; returns the run folder and what was written there."""
    device = resolve_device(config.features.device)  # a GPU named but absent is said before any file is read
    backbone = check_pinned(config.features.backbone_weights, config.model.trunk_sha256, config.features.backbone)
    cache = FeatureCache(config.features.cache_dir)
    index = cache.read_index()
    expected = feature_settings(config)
    # Extra settings (a simulated site's stain transform) describe the data, not a mismatch.
    if {key: index.settings.get(key) for key in expected} != expected or index.backbone != backbone:
        raise UserError(f"{cache.index_path}: the cache was prepared with other trunk weights, tiling or model "
                        "settings than site.yaml now names; run `fedpath-site prepare` again")
    train, classes = load_split(cache, "train")
    val, _ = load_split(cache, "val")
    if not train:
        raise UserError(f"{cache.index_path}: no prepared training slides; run `fedpath-site prepare` first")
    run_dir = new_run_dir(config.training.out_dir)
    use_threads(config.features.threads)
    torch.manual_seed(config.training.seed)
    head = build_trainable(config.model, len(classes), config.features.backbone_weights,
                           trunk=config.features.backbone_weights).to(device)
    dataset = PatientSequences(train, config.sequences.length, config.training.seed)
    history: list[dict] = []

    def after_epoch(epoch: int, loss: float) -> None:
        metrics = evaluate(head, val, classes, config.sequences.length, config.training.positive_class)
        history.append({"epoch": epoch, "train_loss": loss, **{f"val_{k}": metrics.get(k) for k in
                                                               ("loss", "accuracy", "balanced_accuracy", "auc")}})
        log.info("epoch %d: train loss %.4f, val accuracy %s, val AUC %s", epoch, loss,
                 format_metric(metrics.get("accuracy")), format_metric(metrics.get("auc")))
        head.train()

    log.info("%s: training on %d slides of %d patients, validating on %d slides", config.name, len(train),
             len(dataset), len(val))
    result = train_round(head, dataset, config.training, config.privacy, run_dir / "privacy_ledger.json",
                         round_id="local", progress=progress, on_epoch=after_epoch)
    final = {"train": evaluate(head, train, classes, config.sequences.length, config.training.positive_class),
             "val": evaluate(head, val, classes, config.sequences.length, config.training.positive_class)}
    record = {"site": config.name, "classes": classes, "model": config.model.as_dict(),
              "training": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config.training).items()},
              "privacy": asdict(config.privacy), "round": asdict(result), "history": history, "final": final}
    atomic_write(run_dir / "model.pt", lambda handle: torch.save(
        {"model": config.model.as_dict(), "classes": classes, "state_dict": head.cpu().state_dict()}, handle))
    record = to_jsonable(record)
    atomic_write_json(run_dir / "metrics.json", record)
    return LocalRun(run_dir, record)

