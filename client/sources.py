"""A site's labelled items: slides listed in a manifest, or tiles in one folder per class.

An item is the unit the model classifies and the unit of privacy: one slide, or one group of
tiles of a public tile dataset. Reading the list never opens a slide; problems found on the way
(missing columns, empty labels, duplicate rows) are collected, not raised one at a time, so a
site sees all of them at once.
"""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from shared.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Item:
    item_id: str  # unique within the site: the manifest path, or class/first-tile for tile groups
    label: str
    patient: str
    split: str
    files: tuple[Path, ...]  # one slide file, or the image tiles of a tile group
    kind: Literal["slide", "tiles"]


@dataclass(frozen=True)
class Problem:
    where: str  # file (and row) the problem is in
    message: str
    fatal: bool = True


class SourceError(UserError, ValueError):
    """The item list itself cannot be read (no file, no header...)."""


def read_manifest(path: Path, labels: tuple[str, ...], val_fraction: float,
                  split_seed: int) -> tuple[list[Item], list[Problem]]:
    """Items of a manifest CSV (slide, label[, patient][, split]); paths relative to the CSV."""
    if path.is_dir():
        raise SourceError(f"{path}: is a folder; data.manifest names the CSV file that lists the slides")
    if not path.is_file():
        raise SourceError(f"{path}: manifest not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in ("slide", "label") if c not in columns]
            if missing:
                raise SourceError(f"{path}: missing column(s) {', '.join(missing)}; found {columns or 'no header'}"
                                  " (expected slide,label[,patient][,split])")
            # DictReader puts a row's fields beyond the header under the key None (restkey)
            rows = [({k.strip(): (v or "").strip() for k, v in row.items() if k}, row.get(None)) for row in reader]
    except UnicodeDecodeError:
        raise SourceError(f"{path}:{_first_non_utf8(path)}: not UTF-8 text; save it as 'CSV UTF-8' "
                          "(in Excel: Save As, CSV UTF-8)") from None
    except OSError as error:
        raise SourceError(f"{path}: cannot be read ({error.strerror or error})") from None
    except csv.Error as error:
        raise SourceError(f"{path}: not a readable CSV file ({error})") from None

    problems: list[Problem] = []
    items: list[Item] = []
    seen: dict[Path, int] = {}
    for number, (row, extra) in enumerate(rows, start=2):  # row 1 is the header
        where = f"{path}:{number}"
        if extra and any(value.strip() for value in extra):  # a comma inside a value ("Smith, John") shifted the
            # fields: never guess which (empty trailing fields, as spreadsheets write them, are harmless)
            problems.append(Problem(where, f"{len(columns) + len(extra)} fields where the header has "
                                           f"{len(columns)}: a value holding a comma must be quoted (\"Smith, John\")"))
            continue
        if not row.get("slide"):
            problems.append(Problem(where, "empty slide path"))
            continue
        slide = (path.parent / row["slide"]).resolve()
        label = row.get("label", "")
        if not label:
            problems.append(Problem(where, f"{row['slide']}: empty label"))
            continue
        if labels and label not in labels:
            problems.append(Problem(where, f"{row['slide']}: unknown label '{label}' (allowed: {', '.join(labels)})"))
            continue
        split = row.get("split", "")
        if split and split not in SPLITS:
            problems.append(Problem(where, f"{row['slide']}: unknown split '{split}' (allowed: {', '.join(SPLITS)})"))
            continue
        if slide in seen:
            problems.append(Problem(where, f"{row['slide']}: listed twice (first on row {seen[slide]})"))
            continue
        seen[slide] = number
        patient = row.get("patient") or row["slide"]  # without ids, every slide is its own patient
        items.append(Item(row["slide"], label, patient, split, (slide,), "slide"))
    if not rows:
        problems.append(Problem(str(path), "lists no slides (only its header)"))
    return assign_splits(items, val_fraction, split_seed), problems


def _first_non_utf8(path: Path) -> str:
    """Where a file stops being UTF-8: its line and the byte (the decoder's own error counts from the
    start of the chunk it was given, not of the file)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        return f"{line} (byte {data[error.start]:#04x})"
    return "?"


def read_tile_folder(root: Path, labels: tuple[str, ...], group_size: int, val_fraction: float,
                     split_seed: int) -> tuple[list[Item], list[Problem]]:
    """Items of a tile dataset with one sub-folder per class; ``group_size`` tiles make one item."""
    if not root.is_dir():
        raise SourceError(f"{root}: tile folder not found")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if labels:
        found = {p.name for p in class_dirs}
        missing = [name for name in labels if name not in found]
        if missing:
            raise SourceError(f"{root}: no folder for class(es) {', '.join(missing)}; found {sorted(found)}")
        class_dirs = [root / name for name in labels]
    if not class_dirs:
        raise SourceError(f"{root}: no class folders (expected one sub-folder of image tiles per class)")
    items: list[Item] = []
    problems: list[Problem] = []
    for class_dir in class_dirs:
        tiles = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not tiles:
            problems.append(Problem(str(class_dir), "class folder holds no image tiles"))
            continue
        # Groups of consecutive file names, in a seeded order so a group is not one scan's strip.
        tiles = [tiles[i] for i in _seeded_order([t.name for t in tiles], split_seed)]
        for start in range(0, len(tiles) - group_size + 1, group_size):
            group = tuple(tiles[start:start + group_size])
            item_id = f"{class_dir.name}/{group[0].name}"
            items.append(Item(item_id, class_dir.name, item_id, "", group, "tiles"))
        leftover = len(tiles) % group_size
        if leftover:
            problems.append(Problem(str(class_dir), f"{leftover} tile(s) left over after groups of {group_size}",
                                    fatal=False))
    return assign_splits(items, val_fraction, split_seed), problems


def _seeded_order(keys: list[str], seed: int) -> list[int]:
    digest = [hashlib.sha256(f"{seed}:{k}".encode()).hexdigest() for k in keys]
    return sorted(range(len(keys)), key=digest.__getitem__)


def assign_splits(items: list[Item], val_fraction: float, seed: int) -> list[Item]:
    """Fill in missing splits by patient, stratified by label, deterministically per seed.

    Items that already have a split keep it. A patient's items always land in one split.
    """
    fixed = {it.patient: it.split for it in items if it.split}
    open_patients: dict[str, set[str]] = defaultdict(set)
    for it in items:
        if not it.split and it.patient not in fixed:
            open_patients[it.label].add(it.patient)
    chosen: dict[str, str] = dict(fixed)
    for label in sorted(open_patients):
        patients = sorted(open_patients[label])
        patients = [patients[i] for i in _seeded_order(patients, seed)]
        n_val = round(len(patients) * val_fraction)
        if val_fraction > 0 and len(patients) >= 2:
            n_val = min(max(n_val, 1), len(patients) - 1)
        for i, patient in enumerate(patients):
            chosen.setdefault(patient, "val" if i < n_val else "train")
    return [it if it.split else replace(it, split=chosen[it.patient]) for it in items]


def load_items(data) -> tuple[list[Item], list[Problem]]:
    """The items of a site's ``DataConfig``, from its manifest or its tile folder."""
    if data.manifest is not None:
        return read_manifest(data.manifest, data.labels, data.val_fraction, data.split_seed)
    return read_tile_folder(data.tile_folder, data.labels, data.group_size, data.val_fraction, data.split_seed)


def class_names(data, items: list[Item]) -> tuple[str, ...]:
    """Class names in model order: as configured, else the sorted labels present."""
    return data.labels or tuple(sorted({it.label for it in items}))
