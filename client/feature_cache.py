"""The per-site feature cache: one file of tile vectors per item, keyed by what produced it.

A key is the sha256 of the item's file content, the backbone's weights and the tiling settings,
so a rescanned slide, a new trunk or a new tile size each invalidate exactly the entries they
affect, and a renamed slide still hits. Entries are written atomically (``shared.atomic_files``):
a run interrupted at any point leaves only complete entries, and the next run resumes.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from client.slides import SlideError
from shared.atomic_files import atomic_write, atomic_write_json
from shared.errors import UserError
from shared.file_memo import FileMemo

CACHE_FORMAT = 1  # bump when the file layout changes: old entries are then ignored
_CHUNK = 1 << 20
# Entries this process has read, kept while their files are unchanged. Off (0 bytes) unless a long-lived
# process turns it on: the site's task runner serves every round from one process, so there a round after
# the first reads only what `prepare` added or changed; `predict` over a thousand cached slides keeps none.
WARM_ENTRIES = FileMemo(max_bytes=0,
                        size_of=lambda entry: entry.features.nbytes + entry.coords.nbytes + entry.cells.nbytes)
# The share of a GPU's memory that a long-lived process may fill with training vectors kept on the device
# between rounds (``client/sequence_data.py: DEVICE_ENTRIES``); 0: none. The task runner turns it on.
WARM_DEVICE_SHARE = 0.0


class CacheError(UserError):
    """A missing or damaged cache entry or index, with what to run about it."""


def content_sha256(files: Iterable[Path]) -> str:
    """sha256 of the bytes of an item's files (and of the companion folder of an MRXS slide; of every
    file in the folder of a DICOM WSI series)."""
    digest = hashlib.sha256()
    for path in files:
        members = [path]
        companion = path.with_suffix("")
        if path.is_dir():
            members = sorted(p for p in path.rglob("*") if p.is_file())
        elif path.suffix.lower() == ".mrxs" and companion.is_dir():
            members += sorted(p for p in companion.rglob("*") if p.is_file())
        for member in members:
            try:
                with member.open("rb") as handle:
                    while chunk := handle.read(_CHUNK):
                        digest.update(chunk)
            except FileNotFoundError:
                raise SlideError(member, "file not found") from None
            except OSError as exc:
                raise SlideError(member, f"cannot read: {exc.strerror or exc}") from None
    return digest.hexdigest()


def cache_key(content: str, backbone: str, settings: dict) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, "content": content, "backbone": backbone, "settings": settings},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class CachedFeatures:
    features: np.ndarray  # (N, D) float32 tile vectors in spatial order, (N, positions, D) maps in grid mode,
    # or (N, 2048, h, w) float16 last-block inputs for `trainable: last_block`
    coords: np.ndarray  # (N, 2) int64 level-0 x, y
    cells: np.ndarray  # (N, 2) int64 grid column, row
    meta: dict  # item id, label, content and backbone hashes, tiling settings, read plan

    def __len__(self) -> int:
        return len(self.features)


class FeatureCache:
    """Feature files under ``root/features``, plus ``root/index.json`` naming the entry of each item."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path_for(self, key: str) -> Path:
        return self.root / "features" / f"{key}.npz"

    def has(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def save(self, key: str, entry: CachedFeatures) -> None:
        def write(handle) -> None:
            np.savez(handle, features=_stored(entry.features), coords=entry.coords,
                     cells=entry.cells, meta=np.frombuffer(json.dumps(entry.meta).encode(), dtype=np.uint8))

        atomic_write(self.path_for(key), write)

    def load(self, key: str) -> CachedFeatures:
        """The entry of ``key``; read once per unchanged file in a process (``WARM_ENTRIES``). The arrays
        may be shared with later callers: read them, never write to them."""
        try:
            return WARM_ENTRIES.get(self.path_for(key), lambda _: self._read(key, lambda data: CachedFeatures(
                _stored(data["features"]), data["coords"], data["cells"], _meta(data))))
        except FileNotFoundError:
            raise CacheError(f"{self.path_for(key)}: no cached features for this item; run `fedpath-site prepare`") \
                from None

    def meta(self, key: str) -> dict:
        """The entry's description alone (an npz member is only decompressed when asked for)."""
        return self._read(key, _meta)

    def _read(self, key: str, take):
        path = self.path_for(key)
        try:
            with np.load(path) as data:
                return take(data)
        except FileNotFoundError:
            raise CacheError(f"{path}: no cached features for this item; run `fedpath-site prepare`") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise CacheError(f"{path}: damaged cache entry ({exc}); delete it and run `fedpath-site prepare`") from None

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    def write_index(self, index: "CacheIndex") -> None:
        atomic_write_json(self.index_path, asdict(index))

    def read_index(self) -> "CacheIndex":
        try:
            data = json.loads(self.index_path.read_text())
            return CacheIndex(**data)
        except FileNotFoundError:
            raise CacheError(f"{self.index_path}: no prepared features; run `fedpath-site prepare`") from None
        except (ValueError, TypeError) as exc:
            raise CacheError(f"{self.index_path}: damaged index ({exc}); run `fedpath-site prepare` again") from None


def _stored(features: np.ndarray) -> np.ndarray:
    """Block-input maps stay float16 (they are 32x larger than vectors); everything else is float32."""
    return features if features.dtype == np.float16 else features.astype(np.float32)


def _meta(data) -> dict:
    return json.loads(data["meta"].tobytes().decode())


@dataclass(frozen=True)
class CacheIndex:
    """What the last `prepare` produced: the cache entry of every usable item, and how it was made."""

    backbone: str
    settings: dict  # tiling, mpp override, grid mode
    classes: list[str]
    items: dict[str, dict]  # item id -> {key, label, patient, split, tiles}
