"""The slide classifier: InceptionV3 tile vectors, a recurrent layer over a sequence, a classifier.

``SequenceHead`` is the trainable part and reads sequences of 2048-d vectors, whether they come
from the feature cache (``tiles`` mode: T tiles of one slide in spatial order) or from one
tile's 8x8 InceptionV3 map read as 64 positions (``grid`` mode, the reference study's layout).
``SlideClassifier`` composes it with the ``TileEncoder`` to classify from pixels. Variants are
configuration (``ModelConfig``), never copies of code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from shared.encoder import FEATURE_DIM, TileEncoder
from shared.recurrent import RecurrentCore
from shared.yaml_config import at_least, check

Core = Literal["rnn", "lstm", "gru", "mean"]


@dataclass(frozen=True)
class ModelConfig:
    core: Core = "rnn"  # simple RNN scored best in the reference study; "mean" is InceptionV3 alone
    mode: Literal["tiles", "grid"] = "tiles"
    projection: int = check(at_least(1), 128)  # 2048 -> projection before the core: cheap under DP
    hidden: int = check(at_least(1), 128)
    trainable: Literal["head", "last_block"] = "head"

    def as_dict(self) -> dict:
        return asdict(self)


class SequenceHead(nn.Module):
    """[B, T, input_dim] -> logits [B, num_classes].

    Each vector is first scaled to norm sqrt(input_dim): trunks differ wildly in activation
    scale (a randomly initialised InceptionV3 reaches 1e11), and a fixed rescaling needs no
    statistics of private data. Then a linear projection with ReLU, then the core: an
    RNN/LSTM/GRU whose last output summarises the sequence, or ``mean`` pooling over it.
    """

    def __init__(self, num_classes: int, core: Core = "rnn", input_dim: int = FEATURE_DIM,
                 projection: int = 128, hidden: int = 128):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.projection = nn.Linear(input_dim, projection)
        self.core = None if core == "mean" else RecurrentCore(core, projection, hidden)
        self.classifier = nn.Linear(projection if core == "mean" else hidden, num_classes)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        unit = sequences * (sequences.shape[-1] ** 0.5 / sequences.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        steps = torch.relu(self.projection(unit))
        summary = steps.mean(dim=1) if self.core is None else self.core(steps)[:, -1]
        return self.classifier(summary)


def build_head(config: ModelConfig, num_classes: int) -> SequenceHead:
    return SequenceHead(num_classes, config.core, FEATURE_DIM, config.projection, config.hidden)


def grid_sequence(feature_map: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] InceptionV3 map -> [B, H*W, C], positions in row-major order."""
    return feature_map.flatten(2).transpose(1, 2)


class SlideClassifier(nn.Module):
    """Pixels to classes: ``TileEncoder`` + ``SequenceHead``.

    ``tiles`` mode takes [B, T, 3, H, W] (T tiles of a slide); ``grid`` mode takes [B, 3, H, W]
    (one tile, read as its 8x8 map at 299 px). With ``trainable="head"`` the trunk is frozen and
    stays in eval mode even while the model trains: in train mode its BatchNorm statistics would
    move with private data and mix tiles across the batch.
    """

    def __init__(self, encoder: TileEncoder, head: SequenceHead, mode: str = "tiles", trainable: str = "head"):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.mode = mode
        self.trainable = trainable
        encoder.requires_grad_(False)
        if trainable == "last_block":
            encoder.trunk.Mixed_7c.requires_grad_(True)
        self.train(False)

    def train(self, mode: bool = True) -> "SlideClassifier":
        super().train(mode)
        self.encoder.eval()
        if mode and self.trainable == "last_block":
            self.encoder.trunk.Mixed_7c.train()
        return self

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        if self.mode == "grid":
            return self.head(grid_sequence(self.encoder.feature_map(tiles)))
        batch, length = tiles.shape[:2]
        vectors = self.encoder(tiles.flatten(0, 1)).view(batch, length, -1)
        return self.head(vectors)


def build_classifier(config: ModelConfig, num_classes: int, weights: str = "random") -> SlideClassifier:
    return SlideClassifier(TileEncoder(weights), build_head(config, num_classes), config.mode, config.trainable)
