"""Global model checkpoints, one per round, each with a JSON model card that vouches for it.

``run_dir/checkpoints/round-0003.npz`` holds the parameters (plain ``.npy`` members, never
pickles, so loading a checkpoint cannot run code); ``round-0003.json`` is the model card:
what the caller put in it (metrics, sites, the audit log's last hash, ...) plus ``round``,
``checkpoint_file``, ``checkpoint_sha256`` and ``parameters`` (name, shape and dtype of every
array, in the model's order). ``latest.*`` and ``best.*`` are byte-identical copies of a round's
pair, for people and tools that want "the" model.

Loading verifies the npz bytes against the card's sha256 and the arrays against its parameter
list, so a file that was changed, replaced or half-written is refused instead of aggregated.
The round card is written after its npz, so a card on disk marks a completed save: resuming
looks at round cards, not at ``latest.*``, which a crash can leave as a mismatched pair.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.atomic_files import atomic_write_bytes, atomic_write_json
from shared.errors import UserError
from shared.metrics import to_jsonable

CHECKPOINT_DIR = "checkpoints"
CARD_FIELDS = ("round", "checkpoint_file", "checkpoint_sha256", "parameters")
"""Fields :func:`save_checkpoint` adds to the card; the caller's card must not set them."""
ROUND_CARD = re.compile(r"round-(\d{4,})\.json")
HASH_CHUNK = 1 << 20


class CheckpointError(UserError):
    """A checkpoint or its model card is missing, unreadable or does not match the other."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: ``arrays`` in parameter order, ``card`` as stored beside it."""

    round: int
    arrays: dict[str, np.ndarray]
    card: dict[str, Any]
    path: Path


def sha256_file(path: Path) -> str:
    """sha256 hex of a file, read in chunks so large files need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def card_path(checkpoint: Path) -> Path:
    """The model card that belongs to a checkpoint: same name, ``.json``."""
    return Path(checkpoint).with_suffix(".json")


def save_checkpoint(run_dir: Path, round: int, arrays: dict[str, np.ndarray], card: dict[str, Any], best: bool) -> Path:
    """Write round ``round``'s checkpoint and card, refresh ``latest.*`` (and ``best.*`` when
    ``best``), and return the round's npz path. Every file is written atomically."""
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ValueError(f"checkpoint round must be a non-negative integer, got {round!r}.")
    clashing = sorted(set(card) & set(CARD_FIELDS))
    if clashing:
        raise ValueError(f"the model card must not set {clashing}: save_checkpoint adds {list(CARD_FIELDS)} itself.")
    data = _npz_bytes(arrays)
    folder = Path(run_dir) / CHECKPOINT_DIR
    npz = folder / f"round-{round:04d}.npz"
    document = {
        **to_jsonable(card),
        "round": round,
        "checkpoint_file": npz.name,
        "checkpoint_sha256": hashlib.sha256(data).hexdigest(),
        "parameters": [{"name": name, "shape": list(array.shape), "dtype": str(array.dtype)}
                       for name, array in arrays.items()],
    }
    for stem in [npz.stem, "latest"] + (["best"] if best else []):
        atomic_write_bytes(folder / f"{stem}.npz", data)
        atomic_write_json(folder / f"{stem}.json", document)  # after the npz: a card marks a complete save
    return npz


def update_card(run_dir: Path, round: int, changes: dict[str, Any], best: bool) -> dict[str, Any]:
    """Merge ``changes`` into round ``round``'s model card (its parameters and sha256 stay as saved), refresh
    ``latest.json`` when that round is the latest and ``best.*`` when ``best``; the new card.

    A round's metrics arrive one exchange after its model (sites score the model they receive), so
    the card is completed then; the npz never changes."""
    clashing = sorted(set(changes) & set(CARD_FIELDS))
    if clashing:
        raise ValueError(f"a card update must not change {clashing}.")
    folder = Path(run_dir) / CHECKPOINT_DIR
    npz = folder / f"round-{round:04d}.npz"
    card = {**_read_card(npz), **to_jsonable(changes)}
    atomic_write_json(card_path(npz), card)
    latest = folder / "latest.json"
    if latest.is_file() and json.loads(latest.read_text(encoding="utf-8")).get("round") == round:
        atomic_write_json(latest, card)
    if best:
        atomic_write_bytes(folder / "best.npz", npz.read_bytes())
        atomic_write_json(folder / "best.json", card)
    return card


def load_checkpoint(path: Path) -> Checkpoint:
    """Load any checkpoint npz (round, latest or best) after verifying it against its card."""
    path = Path(path)
    card = _read_card(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
    actual = hashlib.sha256(data).hexdigest()
    if actual != card["checkpoint_sha256"]:
        raise CheckpointError(
            f"checkpoint {path} does not match its model card {card_path(path)}: expected sha256 "
            f"{card['checkpoint_sha256']}, actual {actual}. One of the two was changed or replaced after "
            "it was saved; restore both from the same save or use another checkpoint."
        )
    arrays = _read_arrays(path, data)
    _check_parameters(path, arrays, card["parameters"])
    ordered = {entry["name"]: arrays[entry["name"]] for entry in card["parameters"]}
    return Checkpoint(round=card["round"], arrays=ordered, card=card, path=path)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The highest round with a model card in ``run_dir``, verified; None before the first save.

    An npz without a card is an interrupted save and is skipped (the round is saved again).
    """
    rounds = saved_rounds(run_dir)
    return load_checkpoint(rounds[-1][1]) if rounds else None


def saved_rounds(run_dir: Path) -> list[tuple[int, Path]]:
    """(round, npz) of every completed save of a run (its card is on disk), in round order."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    found = [(int(match.group(1)), card.with_suffix(".npz")) for card in folder.glob("round-*.json")
             if (match := ROUND_CARD.fullmatch(card.name))]
    return sorted(found)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The npz file in memory, members in ``arrays`` order, as ``np.savez`` writes it.

    Written member by member rather than through ``np.savez(file, **arrays)`` so that any
    parameter name works (``file`` would clash with its argument) and object arrays, which
    would need pickle, are refused.
    """
    if not arrays:
        raise ValueError("a checkpoint needs at least one parameter array, got none.")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"parameter names must be non-empty strings, got {name!r}.")
            if not isinstance(array, np.ndarray) or array.dtype.hasobject:
                raise ValueError(
                    f"parameter {name!r} must be a numeric numpy array, got {type(array).__name__}"
                    f"{' of objects' if isinstance(array, np.ndarray) else ''}; convert tensors with .numpy()."
                )
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return buffer.getvalue()


def _read_card(path: Path) -> dict[str, Any]:
    card = card_path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    if not card.is_file():
        raise CheckpointError(
            f"checkpoint {path} has no model card: expected {card} beside it. Without the card the "
            "checkpoint cannot be verified; the save was interrupted or the card was removed."
        )
    try:
        document = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"model card {card} is unreadable: {error}") from error
    problem = _card_problem(document)
    if problem:
        raise CheckpointError(f"model card {card} is not a checkpoint card: {problem}.")
    return document


def _card_problem(document: Any) -> str | None:
    """What is wrong with the card's structure, or None when load_checkpoint can rely on it."""
    if not isinstance(document, dict):
        return f"it holds a JSON {type(document).__name__}, not an object"
    missing = [field for field in CARD_FIELDS if field not in document]
    if missing:
        return f"it lacks {missing}"
    if not isinstance(document["checkpoint_sha256"], str):
        return "checkpoint_sha256 is not a string"
    if isinstance(document["round"], bool) or not isinstance(document["round"], int):
        return f"round is {document['round']!r}, not an integer"
    parameters = document["parameters"]
    if not isinstance(parameters, list) or not all(
        isinstance(entry, dict) and {"name", "shape", "dtype"} <= set(entry) for entry in parameters
    ):
        return "parameters must be a list of {name, shape, dtype}"
    return None


def _read_arrays(path: Path, data: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"checkpoint {path} is not a readable npz of numeric arrays: {error}") from error


def _check_parameters(path: Path, arrays: dict[str, np.ndarray], parameters: list[dict[str, Any]]) -> None:
    where = f"checkpoint {path} does not match the parameter list of its model card {card_path(path)}"
    listed = [entry["name"] for entry in parameters]
    if sorted(arrays) != sorted(listed):
        missing = [name for name in listed if name not in arrays]
        extra = [name for name in arrays if name not in listed]
        raise CheckpointError(f"{where}: missing from the file {missing}, not in the card {extra}.")
    for entry in parameters:
        array = arrays[entry["name"]]
        if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
            raise CheckpointError(
                f"{where}: parameter {entry['name']!r} is {array.dtype} {list(array.shape)} in the file "
                f"but {entry['dtype']} {entry['shape']} in the card."
            )
