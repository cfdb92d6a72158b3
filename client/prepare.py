"""`fedpath-site prepare`: tile every item once and cache its tile vectors.

Bad items (unreadable slide, no tissue, unreadable tile) are reported and skipped; the rest go
on. Each item is saved as soon as it is done, so an interrupted run resumes where it stopped and
a second run only reads hashes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from client.feature_cache import CachedFeatures, CacheIndex, FeatureCache, cache_key, content_sha256
from client.features import extract_features, load_encoder
from client.site_config import SiteConfig
from client.slides import failure_reason
from client.sources import Item, class_names, load_items
from client.tile_datasets import TilePlan, TileTransform, plan_item, tile_dataset
from shared.devices import resolve_device, trunk_batch_size
from shared.encoder import INCEPTION, check_pinned

log = logging.getLogger("fedpath.site")


@dataclass(frozen=True)
class Outcome:
    item: Item
    status: str  # "new", "cached", "skipped"
    tiles: int = 0
    reason: str = ""


@dataclass
class PrepareSummary:
    outcomes: list[Outcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # manifest rows that named no usable item
    seconds: float = 0.0
    new_tiles: int = 0

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def tiles(self) -> int:
        return sum(o.tiles for o in self.outcomes)

    def report(self) -> str:
        rows = [(o.item.item_id, o.item.label, o.item.split, str(o.tiles), o.status, o.reason) for o in self.outcomes]
        lines = [format_table(("item", "label", "split", "tiles", "status", "reason"), rows)]
        lines += [f"manifest problem: {p}" for p in self.problems]
        rate = self.new_tiles / self.seconds if self.seconds > 0 else 0.0
        lines.append(
            f"{len(self.outcomes)} items: {self.count('new')} new, {self.count('cached')} from cache, "
            f"{self.count('skipped')} skipped; {self.tiles} tiles ({self.new_tiles} computed) "
            f"in {self.seconds:.1f} s ({rate:.1f} tiles/s)"
        )
        return "\n".join(lines)


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def feature_settings(config: SiteConfig) -> dict:
    """Everything besides slide and weights that changes the vectors, and so belongs in the cache key.
    Last-block training caches the block's input instead of vectors (a key only then: head caches keep theirs)."""
    block = {"block_input": True} if config.model.trainable == "last_block" else {}
    # another trunk than InceptionV3 is named (InceptionV3's caches keep the keys they always had)
    backbone = {"backbone": config.features.backbone} if config.features.backbone != INCEPTION else {}
    return {**asdict(config.tiling), "mpp_override": config.data.mpp_override, "grid": config.model.mode == "grid",
            **block, **backbone}


def prepare_site(config: SiteConfig, progress: bool = True, items: list[Item] | None = None,
                 tile_transform: TileTransform | None = None, encoder_loader=load_encoder) -> PrepareSummary:
    """Tile every item of the site and cache its vectors (or last-block inputs); resumable.

    Args:
        config: the site's config: data source, tiling, trunk weights (checked against a pinned
            ``model.trunk_sha256``), feature cache and model (what is cached depends on its mode
            and trainable part).
        progress: progress bars on stderr.
        items: the items to prepare, with their splits; None: the site's manifest or tile folder.
            A simulation passes the items it dealt to this site.
        tile_transform: a change to every tile before the trunk (a simulated site's stain); it
            becomes part of each cache key.
        encoder_loader: builds the trunk from its weights; a simulation passes one that builds it
            once for all its sites.

    Returns what happened to each item (new, cached, skipped and why). An item already cached
    under the same key (slide bytes, trunk, tiling) is only checked; a bad slide is reported and
    skipped, the others go on.
    """
    start = time.perf_counter()
    summary = PrepareSummary()
    items, problems = load_items(config.data) if items is None else (items, [])
    summary.problems = [f"{p.where}: {p.message}" for p in problems if p.fatal]
    classes = class_names(config.data, items)
    backbone = check_pinned(config.features.backbone_weights, config.model.trunk_sha256, config.features.backbone)
    device = resolve_device(config.features.device)  # a GPU asked for but absent is said before any slide is read
    batch_size = trunk_batch_size(config.features.batch_size, device, config.tiling.tile_size)
    settings = feature_settings(config)
    if tile_transform is not None:
        settings = {**settings, **tile_transform.cache_settings()}
    cache = FeatureCache(config.features.cache_dir)
    log.info("%s: %d items, backbone %s, cache %s, trunk on %s (batch %d)", config.name, len(items), backbone[:12],
             cache.root, device, batch_size)

    keys: dict[str, str] = {}
    todo: list[tuple[Item, TilePlan]] = []
    for item in tqdm(items, desc="planning", unit="item", disable=not progress, leave=False):
        try:
            keys[item.item_id] = key = cache_key(content_sha256(item.files), backbone, settings)
            if cache.has(key):
                summary.outcomes.append(Outcome(item, "cached", cache.meta(key)["tiles"]))
                continue
            plan = plan_item(item, config.tiling, config.data.mpp_override)
        except Exception as exc:  # one bad slide must not stop the site: report it and go on
            summary.outcomes.append(Outcome(item, "skipped", reason=failure_reason(exc)))
            continue
        if len(plan.grid) == 0:
            summary.outcomes.append(Outcome(item, "skipped", reason=(
                f"no tile with >= {config.tiling.min_tissue:.0%} tissue at {config.tiling.target_mpp} µm/px")))
            continue
        todo.append((item, plan))

    total = sum(len(plan.grid) for _, plan in todo)
    encoder = encoder_loader(config.features.backbone_weights, config.features.threads, device,
                             backbone=config.features.backbone) if todo else None
    with tqdm(total=total, desc=f"{config.name} features", unit="tile", disable=not progress) as bar:
        for item, plan in todo:
            try:
                dataset = tile_dataset(item, plan, config.tiling.tile_size, tile_transform)
                vectors = extract_features(encoder, dataset, batch_size,
                                           config.features.num_workers, bar.update, grid=settings["grid"],
                                           block_input=settings.get("block_input", False))
            except Exception as exc:  # e.g. a corrupt tile deep inside a slide
                summary.outcomes.append(Outcome(item, "skipped", reason=failure_reason(exc)))
                continue
            meta = {"item_id": item.item_id, "label": item.label, "tiles": len(plan.grid), "backbone": backbone,
                    "settings": settings, "dimensions": list(plan.dimensions),
                    "read": asdict(plan.read) if plan.read else None}
            cache.save(keys[item.item_id], CachedFeatures(vectors, plan.grid.coords, plan.grid.cells, meta))
            summary.outcomes.append(Outcome(item, "new", len(plan.grid)))
            summary.new_tiles += len(plan.grid)

    order = {item.item_id: i for i, item in enumerate(items)}
    summary.outcomes.sort(key=lambda o: order[o.item.item_id])
    usable = {o.item.item_id: {"key": keys[o.item.item_id], "label": o.item.label, "patient": o.item.patient,
                               "split": o.item.split, "tiles": o.tiles}
              for o in summary.outcomes if o.status != "skipped"}
    cache.write_index(CacheIndex(backbone, settings, list(classes), usable))
    summary.seconds = time.perf_counter() - start
    return summary

