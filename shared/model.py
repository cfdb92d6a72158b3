"""The slide classifier: InceptionV3 tile vectors, a recurrent layer over a sequence, a classifier.

``SequenceHead`` is the trainable part and reads sequences of 2048-d vectors, whether they come
from the feature cache (``tiles`` mode: T tiles of one slide in spatial order) or from one
tile's 8x8 InceptionV3 map read as 64 positions (``grid`` mode, the reference study's layout).
``SlideClassifier`` composes it with the ``TileEncoder`` to classify from pixels. Variants are
configuration (``ModelConfig``), never copies of code.

``frozen_projection`` is the lever that matters most for DP at small hospitals (docs/benchmarks.md,
``dp_levers_small``): the DP noise grows with the number of trainable weights, and the 2048 -> 128
projection is nine tenths of the head's. With it frozen, the projection comes from the pinned trunk
file (``pretrain-encoder`` fits it on the public tiles), is the same at every site, and never trains
or travels: only the recurrent core and the classifier carry DP noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from shared.encoder import (
    FEATURE_DIM,
    LAST_BLOCK,
    PROJECTION_PREFIX,
    TileEncoder,
    WeightsError,
    build_encoder,
    feature_dim,
    read_projection,
)
from shared.model_config import Core, ModelConfig
from shared.recurrent import RecurrentCore


def unit_scale(vectors: torch.Tensor) -> torch.Tensor:
    """Each vector scaled to norm sqrt(dim): trunks differ wildly in activation scale (a randomly
    initialised InceptionV3 reaches 1e11), and a fixed rescaling needs no statistics of private data."""
    return vectors * (vectors.shape[-1] ** 0.5 / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12))


class FrozenProjection(nn.Module):
    """A linear map that never trains and is no part of the state that travels or is checkpointed:
    its weight and bias are non-persistent buffers, filled from the pinned trunk file (``load``).
    Built without them (a server that only needs the model's shapes), it refuses to run."""

    def __init__(self, input_dim: int, output_dim: int) -> None:
        super().__init__()
        self.in_features, self.out_features = input_dim, output_dim
        self.register_buffer("weight", torch.zeros(output_dim, input_dim), persistent=False)
        self.register_buffer("bias", torch.zeros(output_dim), persistent=False)
        self.source: str | None = None  # the trunk file it was loaded from

    def load(self, weights: str | Path) -> "FrozenProjection":
        """Fill from the ``projection.*`` entries of a trunk file (``pretrain-encoder`` writes them)."""
        state = read_projection(Path(weights))
        weight, bias = state.get(PROJECTION_PREFIX + "weight"), state.get(PROJECTION_PREFIX + "bias")
        if weight is None or bias is None:
            raise WeightsError(f"{weights}: the trunk file holds no projection (model.frozen_projection needs a trunk "
                               "from `fedpath-server pretrain-encoder`, which fits one); or set "
                               "model.frozen_projection: false")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise WeightsError(f"{weights}: its projection maps {weight.shape[1]} -> {weight.shape[0]}, the model "
                               f"needs {self.in_features} -> {self.out_features} (model.projection: "
                               f"{self.out_features})")
        self.weight.copy_(weight)
        self.bias.copy_(bias)
        self.source = str(weights)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.source is None:
            raise RuntimeError("the frozen projection was not loaded from the trunk file (FrozenProjection.load)")
        return nn.functional.linear(x, self.weight, self.bias)


class SequenceHead(nn.Module):
    """[B, T, input_dim] -> logits [B, num_classes].

    Each vector is first scaled to norm sqrt(input_dim) (``unit_scale``), then a linear projection
    with ReLU (trainable, or a ``FrozenProjection``), then the core: an RNN/LSTM/GRU whose last
    output summarises the sequence, or ``mean`` pooling over it.
    """

    def __init__(self, num_classes: int, core: Core = "rnn", input_dim: int = FEATURE_DIM,
                 projection: int = 128, hidden: int = 128, frozen_projection: bool = False):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.projection = FrozenProjection(input_dim, projection) if frozen_projection \
            else nn.Linear(input_dim, projection)
        self.core = None if core == "mean" else RecurrentCore(core, projection, hidden)
        self.classifier = nn.Linear(projection if core == "mean" else hidden, num_classes)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        steps = torch.relu(self.projection(unit_scale(sequences)))
        summary = steps.mean(dim=1) if self.core is None else self.core(steps)[:, -1]
        return self.classifier(summary)


def build_head(config: ModelConfig, num_classes: int, trunk: str | Path | None = None) -> SequenceHead:
    """The head of ``config``. Args:
        config: the model variant.
        num_classes: outputs.
        trunk: the trunk weights file a frozen projection is read from; without it a frozen
            projection stays empty (shapes only: what the server needs) and refuses to run.
    """
    head = SequenceHead(num_classes, config.core, feature_dim(config.backbone), config.projection, config.hidden,
                        config.frozen_projection)
    if config.frozen_projection and trunk is not None:
        head.projection.load(trunk)
    return head


# InceptionV3's last block (torchvision's InceptionE, 2048 -> 2048 channels): conv name ->
# (out, in, kernel height, kernel width); padding keeps the map's size.
LAST_BLOCK_CONVS = {
    "branch1x1": (320, 2048, 1, 1),
    "branch3x3_1": (384, 2048, 1, 1), "branch3x3_2a": (384, 384, 1, 3), "branch3x3_2b": (384, 384, 3, 1),
    "branch3x3dbl_1": (448, 2048, 1, 1), "branch3x3dbl_2": (384, 448, 3, 3),
    "branch3x3dbl_3a": (384, 384, 1, 3), "branch3x3dbl_3b": (384, 384, 3, 1),
    "branch_pool": (192, 2048, 1, 1),
}


class FoldedBlock(nn.Module):
    """The trunk's last block as one trainable unit: [B, T, 2048, h, w] block inputs -> [B, T, 2048].

    Each convolution's eval-mode BatchNorm is folded into its weight and bias (same features,
    no batch statistics, nothing Opacus refuses) and ReLU is not in place. The parameters sit on
    this module itself, not on sub-modules, and it takes whole sequences: Opacus then computes
    one per-sample gradient per sequence (one slide) for the whole block, instead of hooking each
    convolution, where the B*T tiles would each count as a sample (``docs/library-notes.md``, Opacus).
    """

    def __init__(self) -> None:
        super().__init__()
        for name, (out, inp, kh, kw) in LAST_BLOCK_CONVS.items():
            self.register_parameter(f"{name}_weight", nn.Parameter(torch.zeros(out, inp, kh, kw)))
            self.register_parameter(f"{name}_bias", nn.Parameter(torch.zeros(out)))

    @classmethod
    def from_trunk_block(cls, block: nn.Module) -> "FoldedBlock":
        """Fold a torchvision InceptionE (conv without bias + BatchNorm, eval statistics) into convs with bias."""
        folded = cls()
        with torch.no_grad():
            for name in LAST_BLOCK_CONVS:
                conv, bn = getattr(block, name).conv, getattr(block, name).bn
                weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                                    bn.weight, bn.bias)
                getattr(folded, f"{name}_weight").copy_(weight)
                getattr(folded, f"{name}_bias").copy_(bias)
        return folded

    def _conv(self, name: str, x: torch.Tensor) -> torch.Tensor:
        _, _, kh, kw = LAST_BLOCK_CONVS[name]
        weight, bias = getattr(self, f"{name}_weight"), getattr(self, f"{name}_bias")
        return torch.relu(nn.functional.conv2d(x, weight, bias, padding=(kh // 2, kw // 2)))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 2048, h, w] -> [N, 2048, h, w], InceptionE's branches in torchvision's order."""
        branch3x3 = self._conv("branch3x3_1", x)
        double = self._conv("branch3x3dbl_2", self._conv("branch3x3dbl_1", x))
        pooled = nn.functional.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self._conv("branch1x1", x),
                          self._conv("branch3x3_2a", branch3x3), self._conv("branch3x3_2b", branch3x3),
                          self._conv("branch3x3dbl_3a", double), self._conv("branch3x3dbl_3b", double),
                          self._conv("branch_pool", pooled)], dim=1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        batch, length = inputs.shape[:2]
        maps = self.feature_map(inputs.flatten(0, 1).float())  # cached block inputs are float16
        return maps.mean(dim=(2, 3)).view(batch, length, -1)


class LastBlockModel(nn.Module):
    """What `trainable: last_block` trains and sends: the folded last block, then the head.
    Reads [B, T, 2048, h, w] cached block inputs (T tiles of one slide per sequence)."""

    def __init__(self, block: FoldedBlock, head: SequenceHead):
        super().__init__()
        self.block = block
        self.head = head

    def forward(self, block_inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(block_inputs))


def build_trainable(config: ModelConfig, num_classes: int, weights: str | None = None,
                    trunk: str | Path | None = None) -> nn.Module:
    """The part of the model that trains and travels: the head, or the last block + head.

    For ``last_block``, ``weights`` names the trunk whose block it starts from (the server's
    initial model); without it the block is zeros, to be filled by ``load_arrays`` (a site
    receiving the global model needs only the shapes). ``trunk`` is the file a frozen
    projection is read from (``build_head``): the site's pinned trunk.
    """
    head = build_head(config, num_classes, trunk)
    if config.trainable == "head":
        return head
    block = FoldedBlock() if weights is None else FoldedBlock.from_trunk_block(
        getattr(TileEncoder(weights).trunk, LAST_BLOCK))
    return LastBlockModel(block, head)


def grid_sequence(feature_map: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] InceptionV3 map -> [B, H*W, C], positions in row-major order."""
    return feature_map.flatten(2).transpose(1, 2)


class SlideClassifier(nn.Module):
    """Pixels to classes: ``TileEncoder`` + ``SequenceHead``.

    ``tiles`` mode takes [B, T, 3, H, W] (T tiles of a slide); ``grid`` mode takes [B, 3, H, W]
    (one tile, read as its 8x8 map at 299 px). The trunk is frozen and stays in eval mode even
    while the model trains: in train mode its BatchNorm statistics would move with private data
    and mix tiles across the batch. Fine-tuning the last block is ``LastBlockModel``'s job, on
    cached block inputs.
    """

    def __init__(self, encoder: nn.Module, head: SequenceHead, mode: str = "tiles"):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.mode = mode
        encoder.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "SlideClassifier":
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        if self.mode == "grid":
            return self.head(grid_sequence(self.encoder.feature_map(tiles)))
        batch, length = tiles.shape[:2]
        vectors = self.encoder(tiles.flatten(0, 1)).view(batch, length, -1)
        return self.head(vectors)


def build_classifier(config: ModelConfig, num_classes: int, weights: str = "random") -> SlideClassifier:
    if config.trainable != "head":
        raise ValueError("build_classifier composes a frozen trunk and the head; for trainable: last_block use "
                         "build_trainable on cached block inputs")
    encoder = build_encoder(config.backbone, weights)
    return SlideClassifier(encoder, build_head(config, num_classes, weights), config.mode)
