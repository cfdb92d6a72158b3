"""The tile encoder: torchvision's InceptionV3 trunk, one 2048-d vector per tile, or another trunk
(``features.backbone: timm:NAME``, ``shared/timm_encoder.py``) through ``build_encoder``.

Weights come from one of three places: ``random`` (a fixed seed, so every site builds the same
trunk: tests and demos), a local ``.pth`` file (hospitals are offline), or ``imagenet``
(torchvision's download, where a machine has internet or a copy in torch's hub cache).
``weights_id`` names the exact trunk (the sha256 of a weights file) without building it, so a
cache can tell whether its vectors are still valid in milliseconds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from shared.errors import UserError
from shared.file_memo import FileMemo
from shared.model_config import INCEPTION, TIMM_PREFIX

FEATURE_DIM = 2048
RANDOM_SEED = 0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAST_BLOCK = "Mixed_7c"  # what `trainable: last_block` fine-tunes: the last InceptionE of torchvision's Inception3
BLOCK_INPUT = "Mixed_7b"  # the block whose output enters it
PROJECTION_PREFIX = "projection."  # the frozen 2048 -> 128 projection pretrain-encoder stores beside the trunk
_DROPPED_PREFIXES = ("fc.", "AuxLogits.", PROJECTION_PREFIX)  # not trunk: classifier parts, fedpath's projection
WRAPPER_PREFIXES = ("module.", "trunk.")


class WeightsError(UserError, RuntimeError):
    """Backbone weights that cannot be loaded, with what to do about it."""


class TrunkMismatch(WeightsError):
    """The configured trunk is not the one the federation pinned by sha256."""


class TileEncoder(nn.Module):
    """InceptionV3 without its classifier: uint8 RGB tiles [B, 3, H, W] -> features [B, 2048].

    Normalisation is part of the module, so callers hand over raw pixels. Inputs of 75 px or more
    work; 299 px is the trunk's native size.
    """

    feature_dim = FEATURE_DIM

    def __init__(self, weights: str | Path = "random"):
        super().__init__()
        self.trunk = _build_trunk(str(weights))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)
        # Outside the module tree (see _up_to_block_input): set through __dict__, not registered.
        self.__dict__["_up_to_block"] = None

    def normalize(self, tiles: torch.Tensor) -> torch.Tensor:
        return (tiles.float() - self.mean) / self.std

    def block_input(self, tiles: torch.Tensor) -> torch.Tensor:
        """The map entering the last block (Mixed_7b's output) [B, 2048, h, w]: what last-block
        training caches, so a round never reruns the frozen part of the trunk."""
        return self._up_to_block_input()(self.normalize(tiles))["block_input"]

    def feature_map(self, tiles: torch.Tensor) -> torch.Tensor:
        """The last block's map [B, 2048, h, w] (8x8 at 299 px), before pooling. The block is looked up
        by name on every call, so a fine-tuned block put in its place (prediction) is the one that runs."""
        return getattr(self.trunk, LAST_BLOCK)(self.block_input(tiles))

    def _up_to_block_input(self) -> nn.Module:
        """The trunk's own forward cut after ``BLOCK_INPUT``: torchvision's feature extractor (torch.fx),
        so the rescaling ImageNet weights expect (``transform_input``) and the order of the blocks are
        torchvision's, not a copy kept here. Traced on first use: tracing costs about half a second,
        which processes that only load the trunk's weights (the server's initial model) never pay.
        Kept out of the module tree: its modules are the trunk's own objects, which ``state_dict``,
        ``parameters`` and ``to`` must see once, under ``trunk`` (a weights file or a pretraining
        checkpoint has the same keys whether or not it ran)."""
        if self._up_to_block is None:
            from torchvision.models.feature_extraction import create_feature_extractor

            self.__dict__["_up_to_block"] = create_feature_extractor(self.trunk, {BLOCK_INPUT: "block_input"})
        if self._up_to_block.training != self.trunk.training:  # its train and eval graphs follow the trunk's mode
            self._up_to_block.train(self.trunk.training)
        return self._up_to_block

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.feature_map(tiles).mean(dim=(2, 3))


def _build_trunk(weights: str) -> nn.Module:
    # torchvision's model zoo costs about 2 s to import; processes that only run the head
    # (a federated round's ClientApp) never pay for it.
    from torchvision.models import inception_v3

    if weights == "imagenet":
        trunk = _imagenet_trunk()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            trunk = inception_v3(weights=None, aux_logits=False, init_weights=True)
    trunk.fc = nn.Identity()
    if weights not in ("random", "imagenet"):
        _load_local(trunk, Path(weights))
    return trunk.eval()


def _imagenet_trunk() -> nn.Module:
    from torchvision.models import Inception_V3_Weights, inception_v3

    try:
        trunk = inception_v3(weights=Inception_V3_Weights.IMAGENET1K_V1)
    except Exception as exc:  # urllib, ssl and socket errors all mean the same thing here
        raise WeightsError(
            f"could not download torchvision's ImageNet InceptionV3 weights ({exc.__class__.__name__}: {exc}). "
            "This machine is probably offline: copy the weights file here and set "
            "features.backbone_weights: /path/to/inception_v3.pth in site.yaml"
        ) from None
    trunk.aux_logits = False
    trunk.AuxLogits = None
    return trunk


def read_weights(path: Path) -> dict:
    """The state dict in a local weights file (unwrapped from ``state_dict``/``model``), with clear errors."""
    if not path.is_file():
        raise WeightsError(f"{path}: backbone weights file not found (features.backbone_weights)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a PyTorch weights file ({exc.__class__.__name__}: {exc})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict of InceptionV3 weights, got {type(state).__name__}")
    return state


def load_trunk_state(trunk: nn.Module, path: Path, what: str, ignore: tuple[str, ...] = ()) -> None:
    """``path``'s weights into ``trunk``, without the wrappers' key prefixes (``WRAPPER_PREFIXES``).

    Args:
        trunk: the module to load into.
        path: a PyTorch weights file (a state dict, possibly wrapped).
        what: what the file should hold, for the error ("InceptionV3 trunk weights").
        ignore: key prefixes of the file that are not the trunk's (a classifier): neither loaded nor an error.

    Raises:
        WeightsError: a key of the trunk is missing from the file, or the file holds one the trunk has not.
    """
    state = {}
    for key, value in read_weights(path).items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        state[key] = value
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    unexpected = [key for key in unexpected if not key.startswith(ignore)] if ignore else unexpected
    if missing or unexpected:
        raise WeightsError(f"{path}: does not hold {what} (missing {len(missing)} keys, e.g. {missing[:3]}; "
                           f"unexpected {len(unexpected)}, e.g. {unexpected[:3]})")


def _load_local(trunk: nn.Module, path: Path) -> None:
    load_trunk_state(trunk, path, "InceptionV3 trunk weights", ignore=_DROPPED_PREFIXES)


def build_encoder(backbone: str, weights: str | Path = "random") -> nn.Module:
    """The frozen tile encoder of ``backbone`` with ``weights``: uint8 tiles [B, 3, H, W] -> [B, feature_dim]."""
    if backbone == INCEPTION:
        return TileEncoder(weights)
    from shared.timm_encoder import TimmEncoder  # timm is imported only by sites that use it

    return TimmEncoder(backbone.removeprefix(TIMM_PREFIX), weights)


def feature_dim(backbone: str) -> int:
    """The length of the vectors ``backbone`` makes (the head's input), without loading any weights."""
    if backbone == INCEPTION:
        return FEATURE_DIM
    from shared.timm_encoder import timm_feature_dim

    return timm_feature_dim(backbone.removeprefix(TIMM_PREFIX))


def weights_id(weights: str | Path, backbone: str = INCEPTION) -> str:
    """sha256 naming the trunk's weights: of the weights file, or of how built-in weights are made
    (for another backbone than InceptionV3, the recipe names it: two random trunks differ)."""
    import torchvision
    from torchvision.models import Inception_V3_Weights

    weights = str(weights)
    if weights == "random" and backbone != INCEPTION:
        from shared.timm_encoder import random_recipe

        recipe = random_recipe(backbone.removeprefix(TIMM_PREFIX))
    elif weights == "random":  # seeded initialisation: identical wherever the same versions run it
        recipe = f"random:seed={RANDOM_SEED}:torch={torch.__version__}:torchvision={torchvision.__version__}"
    elif weights == "imagenet":
        recipe = f"imagenet:{Inception_V3_Weights.IMAGENET1K_V1.url}"
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"{path}: backbone weights file not found (features.backbone_weights)")
        return _FILE_DIGESTS.get(path, _file_sha256)  # a warm site worker hashes the trunk once, not every round
    return hashlib.sha256(recipe.encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_projection(path: Path) -> dict[str, torch.Tensor]:
    """The ``projection.*`` entries of a trunk file (empty when it has none), read once per unchanged
    file in a process (``shared/file_memo.py``): a site builds its model from them every round."""
    return _PROJECTIONS.get(Path(path), lambda p: {key: value for key, value in read_weights(p).items()
                                                   if key.startswith(PROJECTION_PREFIX)})


_FILE_DIGESTS = FileMemo(size_of=len)
_PROJECTIONS = FileMemo(size_of=lambda state: sum(t.numel() * t.element_size() for t in state.values()))


def check_pinned(weights: str | Path, expected: str | None, backbone: str = INCEPTION) -> str:
    """The weights id of ``weights``; raises TrunkMismatch naming the file and the expected hash
    when it is not ``expected`` (None: nothing pinned) or the file is missing."""
    try:
        actual = weights_id(weights, backbone)
    except WeightsError as exc:
        if expected is None:
            raise
        raise TrunkMismatch(f"{exc}; the federation expects trunk weights with sha256 {expected}") from None
    if expected is not None and actual != expected:
        raise TrunkMismatch(f"features.backbone_weights {weights} has sha256 {actual}, but the federation pinned "
                            f"{expected} (model.trunk_sha256): copy the consortium's trunk file here and point "
                            "features.backbone_weights at it")
    return actual
