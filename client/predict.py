"""`fedpath-site predict`: classify slides with a consortium checkpoint and show which tiles drove it.

For every slide (files as given, folders searched recursively for whole-slide image suffixes):
open it, tile it exactly as `prepare` does (the tiling of ``--config site.yaml``, else the
defaults), take its tile vectors from the site's feature cache when `prepare` already computed
them with the same backbone and settings (the same cache key), or compute them, classify it as
evaluation does and explain it by the Shapley value of each tile within its windows
(``client/importance.py``). Per slide, OUT gets
``NAME.json`` (prediction and every tile), ``NAME.tiles.csv``, ``NAME.thumbnail.png``,
``NAME.overlay.png`` (the thumbnail tinted by importance, same size), ``NAME.heatmap.png`` (the
overlay with a title and a colour bar) and ``NAME.geojson`` (the tiles as QuPath objects, in the
slide's own pixels: ``client/qupath.py``); ``predictions.csv``/``.json`` summarise the run. A slide that
cannot be read is reported and skipped; the others go on. The site's cache is only read: a
prediction never changes what training uses. A ``last_block`` checkpoint's fine-tuned block takes
the place of the trunk's own, and its vectors are always computed.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from client.feature_cache import FeatureCache, cache_key, content_sha256
from client.features import extract_features, load_encoder
from client.heatmap import MAX_ALPHA, heatmap_figure, render_heatmap, write_figure, write_png
from client.importance import Explanation, explain_slide
from client.prepare import feature_settings, format_table
from client.qupath import importance_name, tile_collection, write_geojson
from client.sequence_data import SlideFeatures
from client.site_config import FeatureConfig, SiteConfig, TilingConfig
from client.slides import ReadPlan, SlideError, failure_reason, open_slide, thumbnail
from client.tile_datasets import SlideTiles, TimedTiles, plan_slide
from client.trained_model import SlideModel, load_model
from shared.atomic_files import atomic_write_bytes, atomic_write_json
from shared.devices import module_device, resolve_device, trunk_batch_size
from shared.encoder import LAST_BLOCK, TileEncoder, check_pinned
from shared.errors import UserError
from shared.metrics import to_jsonable
from shared.model import FoldedBlock, ModelConfig

log = logging.getLogger("fedpath.site")

# What OpenSlide reads; a folder is searched for these (a file given by name is always tried).
DICOM_SUFFIX = ".dcm"
WSI_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", DICOM_SUFFIX)
THUMBNAIL_SIZE = 1024  # longest side of the thumbnail and heatmap PNGs
SUMMARY = "predictions"


class PredictError(UserError):
    """A checkpoint, option or input that prediction cannot use, with what to do."""


@dataclass(frozen=True)
class PredictSettings:
    """How slides are tiled and turned into vectors, and which cache entries match."""

    tiling: TilingConfig
    mpp_override: float | None
    features: FeatureConfig
    cache_settings: dict | None  # the settings part of `prepare`'s cache key; None: no cache to read

    @classmethod
    def from_site(cls, site: SiteConfig | None, model: ModelConfig) -> "PredictSettings":
        if site is None:  # the checkpoint's trunk architecture, with random weights (demos)
            return cls(TilingConfig(), None, FeatureConfig(backbone=model.backbone), None)
        # The checkpoint's model decides the vectors' layout (grid or not), whatever site.yaml trains.
        return cls(site.tiling, site.data.mpp_override, site.features, feature_settings(replace(site, model=model)))


@dataclass(frozen=True)
class SlideResult:
    path: Path
    name: str  # output files are OUT/NAME.*
    ok: bool
    reason: str = ""
    probabilities: dict[str, float] = field(default_factory=dict)
    predicted: str = ""
    tiles: int = 0
    features: str = ""  # "cache" or "computed"
    timing: dict[str, float] = field(default_factory=dict)  # read_s, features_s, head_s, geojson_s


@dataclass
class PredictRun:
    model: SlideModel
    out: Path
    results: list[SlideResult]

    @property
    def failed(self) -> int:
        return sum(not r.ok for r in self.results)

    def report(self) -> str:
        classes = self.model.classes
        rows = [(r.name, "ok" if r.ok else "failed", r.predicted,
                 *(f"{r.probabilities[c]:.3f}" if r.ok else "" for c in classes), str(r.tiles), r.features, r.reason)
                for r in self.results]
        table = format_table(("slide", "status", "predicted", *(f"p({c})" for c in classes), "tiles", "features",
                              "reason"), rows)
        return (f"{table}\n{len(self.results)} slides: {len(self.results) - self.failed} predicted, {self.failed} "
                f"failed; model round {self.model.round} ({self.model.sha256[:12]}); results in {self.out}")


def find_slides(inputs: Sequence[Path]) -> list[Path]:
    """Files as given; folders searched recursively for whole-slide image suffixes, sorted. A folder
    holding ``.dcm`` files is one slide, a DICOM WSI series (``client/slides.py: series_file``)."""
    found: list[Path] = []
    for path in map(Path, inputs):
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in WSI_SUFFIXES]
            series = {p.parent for p in files if p.suffix.lower() == DICOM_SUFFIX}
            found += sorted(series | {p for p in files if p.suffix.lower() != DICOM_SUFFIX})
        else:
            found.append(path)  # a missing or unreadable file is reported like any bad slide
    return list(dict.fromkeys(found))


def output_names(slides: Sequence[Path]) -> list[str]:
    """File stems as output names; stems that occur twice get a short hash of their path."""
    stems = [p.name if p.is_dir() else p.stem for p in slides]  # a DICOM series: its folder's name
    counts = Counter(stems)
    return [stem if counts[stem] == 1 else f"{stem}-{hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:8]}"
            for stem, p in zip(stems, slides, strict=True)]


def predict(model_path: Path, inputs: Sequence[Path], out: Path, site: SiteConfig | None = None,
            explain: str | None = None, thumbnail_size: int = THUMBNAIL_SIZE, heatmap_alpha: float | None = None,
            progress: bool = True) -> PredictRun:
    """Predict and explain every slide of ``inputs``; write the files described above into ``out``.

    Args:
        model_path: a consortium checkpoint (``.npz``) with its model card (``.json``) beside it;
            it is verified against the card (CheckpointError) and its pinned trunk against the
            site's weights (TrunkMismatch) before any slide is read.
        inputs: slide files, and folders searched recursively for whole-slide image suffixes.
        out: the folder for each slide's JSON, CSV, PNGs and GeoJSON and the run's summary.
        site: the site's config: its tiling, µm/px override, trunk weights and feature cache (the
            vectors of a prepared slide are reused). None: default tiling, random trunk, no cache.
        explain: the class whose evidence the heatmaps show; None: each slide's predicted class.
        thumbnail_size: the longest side of the PNGs in pixels, at least 64.
        heatmap_alpha: opacity of the strongest tiles over the tissue in the overlay and heatmap,
            from 0 (the plain thumbnail) to 1 (opaque); None: ``client.heatmap.MAX_ALPHA``.
        progress: progress bars on stderr.

    Returns every slide's result; a slide that could not be read is one with its reason, and the
    others go on. Raises PredictError when there is nothing to do (no slides, an unknown class, a
    thumbnail too small to show tiles, an opacity outside 0-1).
    """
    model = load_model(model_path)
    if thumbnail_size < 64:
        raise PredictError(f"--thumbnail-size {thumbnail_size}: too small to show tiles; use at least 64 pixels")
    alpha = MAX_ALPHA if heatmap_alpha is None else float(heatmap_alpha)
    if not 0.0 <= alpha <= 1.0:  # NaN fails this too
        raise PredictError(f"--heatmap-alpha {heatmap_alpha}: the opacity of the tiles must be between 0 (plain "
                           "thumbnail) and 1 (opaque tiles)")
    if explain is not None and explain not in model.classes:
        raise PredictError(f"--explain {explain!r} is not a class of this model: {list(model.classes)}")
    settings = PredictSettings.from_site(site, model.config)
    if settings.features.backbone != model.config.backbone:
        raise PredictError(f"the checkpoint's model reads vectors of the {model.config.backbone} backbone, the site's "
                           f"features.backbone is {settings.features.backbone}: predict with the trunk it was "
                           "trained on")
    if model.config.frozen_projection:  # the checkpoint holds what trained; the projection is the trunk file's
        model.head.projection.load(settings.features.backbone_weights)
    slides = find_slides(inputs)
    if not slides:
        raise PredictError(f"no slides in {[str(p) for p in inputs]} (searched for {', '.join(WSI_SUFFIXES)})")
    pipeline = _Pipeline(model, settings, None if explain is None else model.classes.index(explain), alpha)
    results = []
    out = Path(out)
    for path, name in tqdm(list(zip(slides, output_names(slides), strict=True)), desc="slides", unit="slide",
                           disable=not progress):
        try:
            results.append(pipeline.run(path, name, out, thumbnail_size, progress))
        except Exception as exc:  # one bad slide must not stop the others: report it and go on
            log.debug("%s failed", path, exc_info=True)
            results.append(SlideResult(path, name, ok=False, reason=failure_reason(exc)))
    run = PredictRun(model, out, results)
    _write_summary(run)
    return run


class _Pipeline:
    """Slide -> tiles -> vectors -> explanation -> files; the trunk is built once, when first needed."""

    def __init__(self, model: SlideModel, settings: PredictSettings, explain: int | None, alpha: float):
        self.model, self.settings, self.explain, self.alpha = model, settings, explain, alpha
        # A pinned trunk (model.trunk_sha256) is the one the head was trained on: any other is refused.
        self.backbone = check_pinned(settings.features.backbone_weights, model.config.trunk_sha256,
                                     settings.features.backbone)
        # Cached vectors went through the trunk's own last block, not a fine-tuned one.
        usable = settings.features.cache_dir is not None and model.block is None
        self.cache = FeatureCache(settings.features.cache_dir) if usable else None
        self._encoder: TileEncoder | None = None
        self.device = resolve_device(settings.features.device)
        self.batch_size = trunk_batch_size(settings.features.batch_size, self.device, settings.tiling.tile_size)

    def encoder(self) -> TileEncoder:
        if self._encoder is None:
            self._encoder = load_encoder(self.settings.features.backbone_weights, self.settings.features.threads,
                                         self.device, self.settings.features.backbone)
            if self.model.block is not None:
                setattr(self._encoder.trunk, LAST_BLOCK, _FineTunedBlock(self.model.block, self.device))
        return self._encoder

    def run(self, path: Path, name: str, out: Path, thumbnail_size: int, progress: bool) -> SlideResult:
        timing = {"read_s": 0.0, "features_s": 0.0, "head_s": 0.0}
        start = time.perf_counter()
        slide = open_slide(path)
        try:
            thumb, scale = thumbnail(slide, thumbnail_size)
        finally:
            slide.close()
        vectors, coords, read, source = self._vectors(path, timing, progress)
        timing["read_s"] += time.perf_counter() - start - timing["features_s"]
        start = time.perf_counter()
        explanation = explain_slide(self.model.head, SlideFeatures(name, name, -1, vectors), self.model.length,
                                    self.explain)
        timing["head_s"] = time.perf_counter() - start
        self._write(out, name, path, thumb, scale, coords, read, source, explanation, timing)
        classes = self.model.classes
        probabilities = dict(zip(classes, map(float, explanation.probabilities), strict=True))
        return SlideResult(path, name, True, probabilities=probabilities,
                           predicted=classes[explanation.predicted], tiles=len(coords), features=source,
                           timing={k: round(v, 4) for k, v in timing.items()})

    def _vectors(self, path: Path, timing: dict, progress: bool) -> tuple[np.ndarray, np.ndarray, ReadPlan, str]:
        """Tile vectors, level-0 tile corners and read plan of a slide, from the cache or computed."""
        settings = self.settings
        key = None
        if self.cache is not None:
            key = cache_key(content_sha256([path]), self.backbone, settings.cache_settings)
            if self.cache.has(key):
                entry = self.cache.load(key)
                return entry.features, entry.coords, ReadPlan(**entry.meta["read"]), "cache"
        plan = plan_slide(path, settings.tiling, settings.mpp_override)
        if len(plan.grid) == 0:
            raise SlideError(path, f"no tile with >= {settings.tiling.min_tissue:.0%} tissue at "
                                   f"{settings.tiling.target_mpp} µm/px")
        tiles = TimedTiles(SlideTiles(path, plan.grid.coords, plan.read))
        start = time.perf_counter()
        with tqdm(total=len(tiles), desc=path.name, unit="tile", leave=False, disable=not progress) as bar:
            vectors = extract_features(self.encoder(), tiles, self.batch_size,
                                       settings.features.num_workers, bar.update, grid=self.model.config.mode == "grid")
        # Tiles decoded in this process count as reading; with reader processes decoding overlaps the trunk.
        timing["features_s"] = time.perf_counter() - start - tiles.seconds
        return vectors, plan.grid.coords, plan.read, "computed"

    def _write(self, out: Path, name: str, path: Path, thumb: np.ndarray, scale: tuple[float, float],
               coords: np.ndarray, read: ReadPlan, source: str, explanation: Explanation, timing: dict) -> None:
        classes = self.model.classes
        side = read.footprint
        tiles = [{"x": int(x), "y": int(y), "w": side, "h": side, "importance": float(importance),
                  "probability": float(probability)}
                 for (x, y), importance, probability in zip(coords, explanation.importance,
                                                            explanation.tile_probability, strict=True)]
        predicted, explained = classes[explanation.predicted], classes[explanation.explained]
        title = (f"{name}: {predicted}, p = {explanation.probabilities[explanation.predicted]:.3f} "
                 f"(model round {self.model.round})")
        bar_label = f"{importance_name(explained)} (red for, blue against)"
        overlay = render_heatmap(thumb, scale, coords, side, explanation.importance, self.alpha)
        write_png(out / f"{name}.thumbnail.png", thumb)
        write_png(out / f"{name}.overlay.png", overlay)
        write_figure(out / f"{name}.heatmap.png", heatmap_figure(overlay, explanation.importance, title, bar_label))
        atomic_write_bytes(out / f"{name}.tiles.csv", _csv(("x", "y", "w", "h", "importance", "probability"),
                                                            [tuple(t.values()) for t in tiles]))
        start = time.perf_counter()
        write_geojson(out / f"{name}.geojson", tile_collection(tiles, classes, explanation.explained))
        timing["geojson_s"] = time.perf_counter() - start
        atomic_write_json(out / f"{name}.json", to_jsonable({
            "slide": str(path),
            "checkpoint": {"path": str(self.model.path), "sha256": self.model.sha256, "round": self.model.round},
            "model": self.model.config.as_dict(),
            "classes": list(classes),
            "predicted_class": predicted,
            "probabilities": dict(zip(classes, explanation.probabilities, strict=True)),
            "explained_class": explained,
            "importance": "Shapley value of the tile for explained_class within its windows; the slide's sum is its "
                          "probability of explained_class minus chance",
            "tile_size": read.tile_size,
            "mpp": self.settings.tiling.target_mpp,
            "base_mpp": read.base_mpp,
            "level": read.level,
            "features": source,
            "backbone": self.backbone,
            "thumbnail": {"file": f"{name}.thumbnail.png", "width": thumb.shape[1], "height": thumb.shape[0],
                          "level0_px_per_px": list(scale)},
            "overlay": {"file": f"{name}.overlay.png", "alpha": self.alpha},  # pixel-aligned with the thumbnail
            "heatmap": {"file": f"{name}.heatmap.png", "title": title, "colour_bar": bar_label},
            "geojson": f"{name}.geojson",
            "timing": timing,
            "tiles": tiles,
        }))


class _FineTunedBlock(nn.Module):
    """A checkpoint's folded last block in the trunk's place: a map in, a map out, like InceptionE."""

    def __init__(self, block: FoldedBlock, device: torch.device):
        super().__init__()
        # A copy on the trunk's device: the head keeps its own block where it computes (the CPU).
        self.block = block if module_device(block) == device else copy.deepcopy(block).to(device)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.block.feature_map(maps)


def _csv(header: Sequence[str], rows: Sequence[Sequence]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _write_summary(run: PredictRun) -> None:
    classes = run.model.classes
    rows = [(str(r.path), r.name, "ok" if r.ok else "failed", r.predicted,
             *(r.probabilities.get(c, "") for c in classes), r.tiles, r.features, r.reason) for r in run.results]
    atomic_write_bytes(run.out / f"{SUMMARY}.csv", _csv(
        ("slide", "name", "status", "predicted_class", *(f"p_{c}" for c in classes), "tiles", "features", "reason"),
        rows))
    atomic_write_json(run.out / f"{SUMMARY}.json", to_jsonable({
        "checkpoint": {"path": str(run.model.path), "sha256": run.model.sha256, "round": run.model.round},
        "classes": list(classes),
        "predicted": len(run.results) - run.failed,
        "failed": run.failed,
        "slides": [{"slide": str(r.path), "name": r.name, "status": "ok" if r.ok else "failed",
                    "predicted_class": r.predicted or None, "probabilities": r.probabilities or None,
                    "tiles": r.tiles, "features": r.features or None, "reason": r.reason or None,
                    "timing": r.timing or None} for r in run.results],
    }))
