"""A consortium checkpoint as a model a site can run: verified against its card, then built.

The card says which model variant, classes and window length the arrays belong to; a
``trainable: last_block`` checkpoint brings its fine-tuned block along with the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.checkpoints import CheckpointError, load_checkpoint
from shared.model import FoldedBlock, ModelConfig, SequenceHead, build_trainable
from shared.parameters import ParameterMismatch, load_arrays


@dataclass(frozen=True)
class SlideModel:
    """The trained part of a verified checkpoint, with what its card says about how to use it."""

    head: SequenceHead
    block: FoldedBlock | None  # the fine-tuned last block of a `trainable: last_block` model
    config: ModelConfig
    classes: tuple[str, ...]
    length: int  # tiles per window, as trained
    path: Path
    sha256: str
    round: int
    positive_class: str | None = None  # the class sensitivity and AUC are about


def load_model(path: Path, trunk: str | Path | None = None) -> SlideModel:
    """Load a federated checkpoint after verifying it against its model card (CheckpointError if not).

    ``trunk``: the trunk weights file a ``frozen_projection`` model reads its projection from (the
    checkpoint holds only what trained); a frozen projection left unloaded refuses to run.
    """
    checkpoint = load_checkpoint(Path(path))
    card = checkpoint.card
    missing = [key for key in ("model", "classes", "sequence_length") if key not in card]
    if missing:
        raise CheckpointError(f"model card of {path} lacks {missing}: not a fedpath slide-classifier checkpoint.")
    try:
        config = ModelConfig(**card["model"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"model card of {path}: model settings this fedpath cannot build ({exc}).") from None
    classes = tuple(card["classes"])
    trained = build_trainable(config, len(classes), trunk=trunk)
    try:
        load_arrays(trained, list(checkpoint.arrays.values()))
    except ParameterMismatch as exc:
        raise CheckpointError(f"{path} does not fit the model its card describes ({config.as_dict()}): {exc}") from None
    trained.eval()
    head, block = (trained, None) if config.trainable == "head" else (trained.head, trained.block)
    return SlideModel(head, block, config, classes, int(card["sequence_length"]), Path(path),
                      card["checkpoint_sha256"], checkpoint.round, card.get("positive_class"))
