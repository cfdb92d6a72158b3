"""`fedpath-site check`: everything wrong with a site's data, found before any training starts.

Opens every slide (no pixels beyond a thumbnail), so it takes seconds per slide, not minutes.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from client.feature_cache import content_sha256
from client.prepare import format_table
from client.site_config import SiteConfig
from client.slides import failure_reason
from client.sources import SPLITS, Item, class_names, load_items
from client.tile_datasets import plan_item


@dataclass(frozen=True)
class ItemCheck:
    item: Item
    tiles: int
    error: str = ""


@dataclass
class CheckReport:
    site: str
    classes: tuple[str, ...] = ()
    items: list[ItemCheck] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # each names the file (and row) and the reason
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def class_counts(self) -> dict[str, Counter]:
        counts: dict[str, Counter] = defaultdict(Counter)
        for check in self.items:
            if not check.error:
                counts[check.item.split][check.item.label] += 1
        return counts

    def render(self) -> str:
        rows = [(c.item.item_id, c.item.label, c.item.split, c.item.patient, str(c.tiles), c.error or "ok")
                for c in self.items]
        out = [f"site {self.site}: {len(self.items)} items",
               format_table(("item", "label", "split", "patient", "tiles", "status"), rows), ""]
        counts = self.class_counts()
        splits = [s for s in SPLITS if s in counts]
        out.append(format_table(("class",) + tuple(splits),
                                [(name,) + tuple(str(counts[s][name]) for s in splits) for name in self.classes]))
        out += [""] + [f"warning: {w}" for w in self.warnings] + [f"error: {e}" for e in self.errors]
        out.append(f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        return "\n".join(out)


EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
"""What a 0-byte file or an empty folder hashes to."""


def check_site(config: SiteConfig) -> CheckReport:
    """`fedpath-site check`: everything wrong with the site's manifest or tile folder, before anything is read
    at length: every item opened and tiled (a thumbnail, not its pixels), duplicates by content, items
    without tissue, patients in more than one split, classes without training items (warnings).

    Args:
        config: the site's site.yaml, loaded.
    """
    report = CheckReport(config.name)
    items, problems = load_items(config.data)
    report.classes = class_names(config.data, items)
    for problem in problems:
        (report.errors if problem.fatal else report.warnings).append(f"{problem.where}: {problem.message}")

    by_content: dict[str, Item] = {}
    for item in items:
        error = ""
        tiles = 0
        try:
            digest = content_sha256(item.files)
            if digest in by_content and digest != EMPTY_SHA256:  # empty files are not copies: opening says why
                error = f"duplicate: same content as {by_content[digest].item_id}"
            else:
                by_content[digest] = item
                tiles = len(plan_item(item, config.tiling, config.data.mpp_override).grid)
                if tiles == 0:
                    error = (f"no tissue: no tile with >= {config.tiling.min_tissue:.0%} tissue "
                             f"at {config.tiling.target_mpp} µm/px")
        except Exception as exc:  # every unreadable item is reported, none stops the check
            error = failure_reason(exc)
        report.items.append(ItemCheck(item, tiles, error))
        if error:
            report.errors.append(f"{item.files[0]}: {error}")

    splits_of: dict[str, set[str]] = defaultdict(set)
    for item in items:
        splits_of[item.patient].add(item.split)
    for patient, splits in sorted(splits_of.items()):
        if len(splits) > 1:
            report.errors.append(f"patient {patient} is in more than one split ({', '.join(sorted(splits))}): "
                                 "a model would be validated on a patient it trained on")
    counts = report.class_counts()
    for name in report.classes:
        if counts["train"][name] == 0:
            report.warnings.append(f"class '{name}' has no usable training item")
    return report
