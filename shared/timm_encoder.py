"""Bring your own tile encoder: a model of the ``timm`` package as the frozen trunk
(``features.backbone: timm:NAME``), in place of InceptionV3.

Pathology groups distribute self-supervised ViTs and ResNets as weight files; most are timm
architectures. fedpath builds the architecture by name with no classifier (``num_classes=0``, so the
model returns its pooled features), loads a local weights file (hospitals are offline; nothing is
downloaded), and pins it by sha256 exactly like the InceptionV3 trunk (``model.trunk_sha256``). What
fedpath does not guess, timm states: the feature size (``num_features``, the head's input) and the
preprocessing the weights expect (input size, mean and std: ``timm.data.resolve_model_data_config``).
Tiles are cut at ``tiling.tile_size`` as always and resized to the model's input size inside the
module, so callers hand over raw uint8 pixels, as to ``TileEncoder``.

InceptionV3-only features stay InceptionV3's: ``mode: grid`` (its 8x8 map), ``trainable: last_block``
(its Mixed_7c) and ``frozen_projection`` (``pretrain-encoder`` fits it on InceptionV3) are refused for
another backbone in the model config.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from shared.encoder import RANDOM_SEED, WeightsError, load_trunk_state


def _timm():
    try:
        import timm
    except ModuleNotFoundError:
        raise WeightsError("features.backbone timm:...: the timm package is not installed here "
                           "(pip install 'fedpath[timm]')") from None
    return timm


def _create(name: str) -> nn.Module:
    try:
        return _timm().create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # timm: "Unknown model (NAME)"
        raise WeightsError(f"features.backbone timm:{name}: {exc} (`timm.list_models()` lists the names)") from None


class TimmEncoder(nn.Module):
    """A timm model without its classifier: uint8 RGB tiles [B, 3, H, W] -> features [B, num_features].

    Args:
        name: the timm model name (``timm.list_models()``), e.g. ``vit_small_patch16_224``.
        weights: ``random`` (seeded: identical at every site; tests) or a local weights file (a state dict,
            also wrapped in ``state_dict``/``model``, with or without its classifier).
    """

    def __init__(self, name: str, weights: str | Path = "random"):
        super().__init__()
        weights = str(weights)
        if weights == "imagenet":
            raise WeightsError(f"features.backbone timm:{name}: give a local weights file in "
                               "features.backbone_weights (fedpath downloads nothing for timm backbones)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            self.trunk = _create(name)
        if weights != "random":
            _load(self.trunk, name, Path(weights))
        self.trunk.eval()
        config = _timm().data.resolve_model_data_config(self.trunk)
        self.name, self.feature_dim = name, int(self.trunk.num_features)
        self.input_size = tuple(int(side) for side in config["input_size"][1:])
        self.register_buffer("mean", torch.tensor(config["mean"]).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(config["std"]).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        pixels = tiles.float()
        if tuple(pixels.shape[-2:]) != self.input_size:  # the size the weights were trained at
            pixels = nn.functional.interpolate(pixels, size=self.input_size, mode="bilinear", antialias=True,
                                               align_corners=False)
        return self.trunk((pixels - self.mean) / self.std)


def _load(trunk: nn.Module, name: str, path: Path) -> None:
    classifier = trunk.pretrained_cfg.get("classifier") or "head"  # its classifier: not the trunk
    load_trunk_state(trunk, path, f"timm {name} weights", ignore=(f"{classifier}.",))


@functools.cache
def timm_feature_dim(name: str) -> int:
    """``num_features`` of the timm model, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return int(_create(name).num_features)


def random_recipe(name: str) -> str:
    """What names a seeded random timm trunk (its weights id is this text's sha256)."""
    return f"timm:{name}:random:seed={RANDOM_SEED}:torch={torch.__version__}:timm={_timm().__version__}"
