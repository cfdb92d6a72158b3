"""`fedpath-server pretrain-encoder`: the consortium trains the InceptionV3 trunk on public tiles.

Central training without DP on a public labelled tile dataset (one sub-folder per class), before
any federated round: nothing private is involved. The trunk learns tissue from tiles of the size
the sites will use, with H&E augmentation (flips, 90° rotations, jitter of the haematoxylin and
eosin optical densities rather than of hue, so the colours stay those of a stain). Every epoch
is checkpointed to ``OUT.partial``; running the same command again continues from there. The
result is a trunk state dict that ``TileEncoder`` loads as a local ``.pth``, and a metadata JSON
beside it whose ``sha256`` is what ``model.trunk_sha256`` pins in server.yaml.

Last, the trunk frozen, a 2048 -> 128 projection (``projection.*`` in the same file) is fitted on the
same public tiles: what ``model.frozen_projection`` reads at every site, so that DP noise falls on
the small recurrent core and classifier only (``attach_projection``, also usable on a trunk
pretrained before it existed).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from shared.atomic_files import atomic_write, atomic_write_json
from shared.devices import module_device, resolve_device
from shared.encoder import FEATURE_DIM, PROJECTION_PREFIX, TileEncoder, read_weights, weights_id
from shared.errors import UserError
from shared.he_stains import compose, concentrations, stain_matrix
from shared.image_tiles import read_image_tile
from shared.metrics import classification_metrics, to_jsonable
from shared.model import unit_scale
from shared.model_config import device_rule
from shared.yaml_config import positive

log = logging.getLogger("fedpath.server")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
METADATA_FORMAT = "fedpath-encoder/1"


class PretrainError(UserError):
    """A tile folder or a resume state that pretraining cannot use, with what to do about it."""


@dataclass(frozen=True)
class PretrainSettings:
    tile_size: int = 96  # pixels; small so a CPU can train, and the size the sites tile at
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.1
    seed: int = 0
    init: str = "random"  # starting trunk: random, imagenet, or a .pth
    mpp: float | None = None  # µm/px of the tiles, recorded so sites can tile at the same scale
    stain_jitter: float = 0.05  # scale and shift of each stain's optical density
    num_workers: int = 1
    device: str = "auto"  # auto (the first CUDA GPU, else the CPU), cpu, cuda, cuda:N, mps: shared/devices.py

    def __post_init__(self) -> None:
        if self.tile_size < 75:
            raise PretrainError(f"tile size {self.tile_size}: InceptionV3 needs at least 75 px")
        if self.epochs < 0 or self.batch_size < 2:
            raise PretrainError("epochs must be >= 0 (0: keep the starting trunk, fit only the projection) and "
                                "batch size >= 2 (BatchNorm trains on batch statistics)")
        if not 0 < self.val_fraction < 1:
            raise PretrainError(f"validation fraction {self.val_fraction} must be between 0 and 1 (exclusive)")
        if device_rule(self.device):
            raise PretrainError(f"device {self.device!r} {device_rule(self.device)}")
        problem = _number_problem(self)
        if problem:
            raise PretrainError(problem)


# numpy refuses a negative seed (the split); torch one above 64 bits (each epoch's shuffle: seed * 1000 + epoch).
MAX_SEED = 2**32 - 1


def _number_problem(settings: PretrainSettings) -> str | None:
    """What is wrong with a numeric setting, said before any work: NaN passes ``<= 0`` (False for it) and a
    bad one would fail only after training, once the trunk is written."""
    if positive(settings.learning_rate):
        return f"learning rate (--lr) {settings.learning_rate}: {positive(settings.learning_rate)}"
    if not 0 <= settings.weight_decay < math.inf:
        return f"weight decay {settings.weight_decay}: must be a finite number >= 0"
    if not 0 <= settings.stain_jitter < 1:  # each stain is scaled by 1 ± it
        return f"stain jitter {settings.stain_jitter}: must be at least 0 and below 1"
    if not 0 <= settings.seed <= MAX_SEED:
        return f"seed (--seed) {settings.seed}: must be between 0 and {MAX_SEED}"
    if settings.mpp is not None and positive(settings.mpp):
        return f"µm per pixel (--mpp) {settings.mpp}: {positive(settings.mpp)}"
    if settings.num_workers < 0:
        return f"tile-reading processes (--workers) {settings.num_workers}: must be >= 0 (0: read in this process)"
    return None


@dataclass(frozen=True)
class PretrainResult:
    weights: Path
    metadata: Path
    sha256: str
    record: dict


def find_tiles(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted folder names) and (tile, class index) pairs; clear errors for bad folders."""
    root = Path(root)
    if not root.is_dir():
        raise PretrainError(f"{root}: tile folder not found")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if len(class_dirs) < 2:
        raise PretrainError(f"{root}: found {len(class_dirs)} class folder(s); pretraining needs one sub-folder of "
                            "image tiles per class, at least two classes")
    tiles, empty = [], []
    for index, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            empty.append(class_dir.name)
        tiles += [(path, index) for path in files]
    if empty:
        raise PretrainError(f"{root}: class folder(s) {', '.join(empty)} hold no image tiles "
                            f"({', '.join(IMAGE_SUFFIXES)}); remove them or add tiles")
    return [p.name for p in class_dirs], tiles


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training and validation tiles, the same fraction of every class held out."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = min(max(1, round(len(members) * val_fraction)), len(members) - 1) if len(members) > 1 else 0
        val += members[:n_val].tolist()
        train += members[n_val:].tolist()
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def stain_jitter(tile: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Scale and shift each stain's concentration (HED space), as staining differs between labs."""
    scale = rng.uniform(1 - amount, 1 + amount, size=3).astype(np.float32)
    shift = rng.uniform(-amount, amount, size=3).astype(np.float32)
    return compose(concentrations(tile) * scale + shift, stain_matrix(), tile.shape)


def augment(tile: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """H&E tiles have no orientation: any flip and quarter turn, then stain jitter."""
    tile = np.rot90(tile, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        tile = tile[:, ::-1]
    return stain_jitter(np.ascontiguousarray(tile), rng, amount) if amount > 0 else np.ascontiguousarray(tile)


class TileImages(Dataset):
    """(uint8 HWC tile, class index) at ``tile_size``, augmented when ``augment_amount`` is given."""

    def __init__(self, tiles: list[tuple[Path, int]], tile_size: int, augment_amount: float | None, seed: int):
        self.tiles, self.tile_size, self.amount, self.seed = tiles, tile_size, augment_amount, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.tiles[index]
        try:
            tile = read_image_tile(path, self.tile_size)
        except ValueError as exc:
            raise PretrainError(f"{path}: {exc}") from None
        if self.amount is not None:  # seeded per tile and epoch: a resumed run sees the same augmentations
            tile = augment(tile, np.random.default_rng((self.seed, self.epoch, index)), self.amount)
        return tile, label


def _collate(batch: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    tiles = torch.from_numpy(np.stack([t for t, _ in batch])).permute(0, 3, 1, 2)
    return tiles, torch.tensor([label for _, label in batch])


class TrunkClassifier(nn.Module):
    """The trunk with a linear classifier on its pooled vector: what pretraining optimises."""

    def __init__(self, encoder: TileEncoder, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.encoder(tiles))


@torch.inference_mode()
def _validate(model: TrunkClassifier, loader: DataLoader, classes: list[str]) -> dict:
    model.eval()
    device = module_device(model)
    probs, labels = [], []
    for tiles, batch_labels in loader:
        probs.append(torch.softmax(model(tiles.to(device, non_blocking=True)), dim=-1).cpu().numpy())
        labels.append(batch_labels.numpy())
    metrics = classification_metrics(np.concatenate(labels), np.concatenate(probs), classes)
    return {k: float(metrics[k]) for k in ("accuracy", "balanced_accuracy", "loss")}


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def metadata_path(out: Path) -> Path:
    return out.with_suffix(".json")


def pretrain_encoder(tiles_dir: Path, out: Path, settings: PretrainSettings = PretrainSettings(),
                     progress: bool = True, projection: int = 128) -> PretrainResult:
    """Train the trunk on ``tiles_dir``; write ``out`` (trunk state dict) and its metadata JSON.

    Args:
        tiles_dir: public tiles, one sub-folder per class.
        out: the weights file to write (its metadata JSON goes beside it).
        settings: tile size, epochs, optimiser, augmentation.
        progress: progress bars.
        projection: the size of the frozen projection fitted afterwards (``attach_projection``;
            ``model.projection`` must match it); 0 fits none.
    """
    if projection < 0:  # said now: attach_projection would fail only after training, the trunk written
        raise PretrainError(f"projection size (--projection) {projection}: must be >= 0 (0: none)")
    out = Path(out)
    classes, tiles = find_tiles(tiles_dir)
    train_idx, val_idx = stratified_split(np.array([label for _, label in tiles]), settings.val_fraction, settings.seed)
    train_set = TileImages([tiles[i] for i in train_idx], settings.tile_size, settings.stain_jitter, settings.seed)
    val_set = TileImages([tiles[i] for i in val_idx], settings.tile_size, None, settings.seed)
    device = resolve_device(settings.device)
    torch.manual_seed(settings.seed)
    # Trained in float32 on every device: the trunk's weights are the product here, not a cache.
    model = TrunkClassifier(TileEncoder(settings.init), len(classes)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps_per_epoch = -(-len(train_set) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.learning_rate,
                                                   total_steps=max(1, settings.epochs * steps_per_epoch),
                                                   pct_start=0.15)
    # What a checkpoint must match to be continued (reader processes do not change the result).
    identity = {"tiles": str(Path(tiles_dir).resolve()), "classes": classes, "tiles_total": len(tiles),
                "settings": {k: v for k, v in asdict(settings).items() if k not in ("num_workers", "device")}}
    history: list[dict] = []
    first_epoch = 1
    partial = partial_path(out)
    if partial.exists():
        state = _load_partial(partial, identity)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        history, first_epoch = state["history"], state["epoch"] + 1
        log.info("%s: continuing after epoch %d of %d", partial, state["epoch"], settings.epochs)

    workers = settings.num_workers
    start = time.perf_counter()
    for epoch in range(first_epoch, settings.epochs + 1):
        train_set.epoch = epoch
        generator = torch.Generator().manual_seed(settings.seed * 1000 + epoch)
        loader = DataLoader(train_set, batch_size=settings.batch_size, shuffle=True, generator=generator,
                            drop_last=len(train_set) > settings.batch_size, num_workers=workers,
                            collate_fn=_collate, pin_memory=device.type == "cuda")
        model.train()
        losses = []
        for batch, labels in tqdm(loader, desc=f"epoch {epoch}/{settings.epochs}", unit="batch",
                                  disable=not progress, leave=False):
            optimizer.zero_grad(set_to_none=True)
            batch, labels = batch.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            loss = nn.functional.cross_entropy(model(batch), labels)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        val = _validate(model, DataLoader(val_set, batch_size=64, num_workers=workers, collate_fn=_collate), classes)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)),
                        **{f"val_{k}": v for k, v in val.items()}})
        log.info("epoch %d/%d: train loss %.4f, val accuracy %.3f", epoch, settings.epochs, history[-1]["train_loss"],
                 val["accuracy"])
        state = {"identity": identity, "epoch": epoch, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "history": history}
        atomic_write(partial, functools.partial(torch.save, state))

    trunk_state = {key: value.cpu() for key, value in model.encoder.trunk.state_dict().items()}
    atomic_write(out, lambda handle: torch.save(trunk_state, handle))
    digest = weights_id(out)
    record = to_jsonable({
        "format": METADATA_FORMAT, "weights": out.name, "sha256": digest, "classes": classes,
        "tile_size": settings.tile_size, "mpp": settings.mpp, "tiles": identity["tiles"],
        "train_tiles": len(train_set), "val_tiles": len(val_set), "settings": asdict(settings), "device": str(device),
        "seconds_this_run": round(time.perf_counter() - start, 1), "history": history,
        # epochs 0: the starting trunk as it is (only the projection is fitted), nothing validated here
        "validation": {k.removeprefix("val_"): v for k, v in history[-1].items() if k.startswith("val_")}
        if history else None,
        "use": {"site.yaml": {"features": {"backbone_weights": str(out)}, "tiling": {"tile_size": settings.tile_size}},
                "server.yaml": {"model": {"trunk_sha256": digest}}},
    })
    atomic_write_json(metadata_path(out), record)
    result = PretrainResult(out, metadata_path(out), digest, record)
    if projection:
        result = attach_projection(result, tiles_dir, settings, projection, progress)
    # Kept until the projection is fitted: a run cut short in it continues after the last epoch.
    partial.unlink(missing_ok=True)  # the finished weights replace it; a rerun starts afresh
    return result


def _vectors(encoder: TileEncoder, dataset: Dataset, workers: int, progress: bool) -> torch.Tensor:
    """Unit-scaled float32 vectors of ``dataset``'s tiles, on the CPU, computed where ``encoder`` lives
    (in float32: the projection is fitted on them, and the sites' vectors are compared with them)."""
    device = module_device(encoder)
    loader = DataLoader(dataset, batch_size=64, num_workers=workers, collate_fn=_collate)
    with torch.inference_mode():
        return unit_scale(torch.cat([encoder(tiles.to(device)).cpu() for tiles, _ in
                                     tqdm(loader, desc="trunk vectors", unit="batch", disable=not progress,
                                          leave=False)]))


def attach_projection(result: PretrainResult, tiles_dir: Path, settings: PretrainSettings, size: int = 128,
                      progress: bool = True, epochs: int = 40) -> PretrainResult:
    """Fit the frozen projection on the trunk's vectors of the public tiles and store it in the weights file.

    The trunk is frozen; a ``size``-wide linear layer with ReLU and a linear classifier learn the
    pretraining classes from the unit-scaled 2048-d vectors (as ``SequenceHead`` scales them) of
    the same training tiles, unaugmented; the validation tiles score it. The weights file gains
    ``projection.weight`` and ``projection.bias`` (the trunk loader ignores them), so its sha256,
    the pin, covers the projection too; the metadata JSON is rewritten with the new sha256.

    Args:
        result: a finished ``pretrain_encoder`` (weights and metadata).
        tiles_dir: the tiles it was pretrained on.
        settings: its settings (tile size, validation split, seed).
        size: the projection's output size (``model.projection``).
        progress: progress bars.
        epochs: passes over the vectors.
    """
    if size < 1:
        raise PretrainError(f"projection size (--projection) {size}: must be >= 1")
    classes, tiles = find_tiles(tiles_dir)
    train_idx, val_idx = stratified_split(np.array([label for _, label in tiles]), settings.val_fraction, settings.seed)
    encoder = TileEncoder(result.weights).eval().to(resolve_device(settings.device))
    train = _vectors(encoder, TileImages([tiles[i] for i in train_idx], settings.tile_size, None, settings.seed),
                     settings.num_workers, progress)
    val = _vectors(encoder, TileImages([tiles[i] for i in val_idx], settings.tile_size, None, settings.seed),
                   settings.num_workers, progress)
    train_labels = torch.tensor([tiles[i][1] for i in train_idx])
    val_labels = np.array([tiles[i][1] for i in val_idx])
    torch.manual_seed(settings.seed)
    projection, classifier = nn.Linear(FEATURE_DIM, size), nn.Linear(size, len(classes))
    optimizer = torch.optim.AdamW([*projection.parameters(), *classifier.parameters()], lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(settings.seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(train), generator=generator).split(64):
            optimizer.zero_grad(set_to_none=True)
            logits = classifier(torch.relu(projection(train[batch])))
            nn.functional.cross_entropy(logits, train_labels[batch]).backward()
            optimizer.step()
    with torch.inference_mode():
        probs = torch.softmax(classifier(torch.relu(projection(val))), dim=-1).numpy()
    metrics = classification_metrics(val_labels, probs, classes)
    state = {key: value for key, value in read_weights(result.weights).items() if not key.startswith(PROJECTION_PREFIX)}
    state.update({PROJECTION_PREFIX + "weight": projection.weight.detach().clone(),
                  PROJECTION_PREFIX + "bias": projection.bias.detach().clone()})
    atomic_write(result.weights, functools.partial(torch.save, state))
    digest = weights_id(result.weights)
    record = to_jsonable({
        **result.record, "sha256": digest,
        "projection": {"size": size, "epochs": epochs, "fitted_on": "the trunk's vectors of the training tiles",
                       "validation": {k: float(metrics[k]) for k in ("accuracy", "balanced_accuracy", "loss")}},
        "use": {"site.yaml": result.record["use"]["site.yaml"],
                "server.yaml": {"model": {"trunk_sha256": digest, "projection": size, "frozen_projection": True}}}})
    atomic_write_json(result.metadata, record)
    log.info("projection %d fitted on the frozen trunk: validation accuracy %.3f", size, metrics["accuracy"])
    return PretrainResult(result.weights, result.metadata, digest, record)


def _load_partial(path: Path, identity: dict) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainError(f"{path}: unreadable checkpoint ({exc.__class__.__name__}); delete it to start over") \
            from None
    if state.get("identity") != identity:
        raise PretrainError(f"{path}: an interrupted run with other tiles or settings; rerun with the same options "
                            "to continue it, or delete the file to start over")
    return state


def summary(result: PretrainResult) -> str:
    val = result.record["validation"]
    projection = result.record.get("projection")
    return (f"trunk weights  {result.weights}\nmetadata       {result.metadata}\nsha256         {result.sha256}\n"
            + (f"validation     accuracy {val['accuracy']:.3f}, balanced accuracy {val['balanced_accuracy']:.3f} "
               f"on {result.record['val_tiles']} tiles\n" if val else
               f"trunk          {result.record['settings']['init']}, not trained (--epochs 0)\n")
            + (f"projection     {FEATURE_DIM} -> {projection['size']}, frozen at sites (model.frozen_projection: "
               f"true); validation accuracy {projection['validation']['accuracy']:.3f}\n" if projection else "") +
            f"sites set features.backbone_weights to this file (tiling.tile_size {result.record['tile_size']}); "
            f"server.yaml pins it with model.trunk_sha256: {result.sha256}")
