"""The model's and the trunk's settings, without torch: what a site.yaml or server.yaml may say about
them, and the checks that say what is wrong.

Every process that reads a config reads these, and most never compute: the site's supervisor, the
task runner before its first task, `fedpath-site check`, the admin's commands. Importing torch costs
each of them about 3 s of CPU; the modules that build and run the model (``shared/model.py``,
``shared/encoder.py``, ``shared/devices.py``) import torch and these settings from here.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Literal

from shared.yaml_config import SettingError, between, check

INCEPTION = "inception_v3"  # the default backbone, the mission's model
TIMM_PREFIX = "timm:"  # timm:NAME, a model of the timm package (shared/timm_encoder.py)
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def backbone_rule(value: str) -> str | None:
    """Validator of ``features.backbone`` / ``model.backbone``."""
    if value == INCEPTION or (value.startswith(TIMM_PREFIX) and re.fullmatch(r"[A-Za-z0-9_.\-]+",
                                                                             value[len(TIMM_PREFIX):])):
        return None
    return (f"must be {INCEPTION} or {TIMM_PREFIX}NAME (a model of the timm package, e.g. "
            f"{TIMM_PREFIX}vit_small_patch16_224)")


def device_rule(value: str) -> str | None:
    """Config check for ``features.device``."""
    if DEVICE_PATTERN.fullmatch(value):
        return None
    return "must be auto, cpu, cuda, cuda:N (N = the GPU's index) or mps"


def batch_size_rule(value: int | str) -> str | None:
    """Config check for ``features.batch_size``: a positive number of tiles, or ``auto``."""
    if value == "auto" or (isinstance(value, int) and value >= 1):
        return None
    return "must be a number of tiles >= 1, or auto"


Core = Literal["rnn", "lstm", "gru", "mean"]


@dataclass(frozen=True)
class ModelConfig:
    core: Core = "rnn"  # simple RNN scored best in the reference study; "mean" is InceptionV3 alone
    mode: Literal["tiles", "grid"] = "tiles"
    # 2048 -> projection before the core: cheap under DP. Bounded like every size a server may ask of a site.
    projection: int = check(between(1, 65_536), 128)
    hidden: int = check(between(1, 65_536), 128)
    trainable: Literal["head", "last_block"] = "head"
    # The projection from the pinned trunk file, frozen and never sent (only the core and classifier train
    # under DP); needs a trunk from `fedpath-server pretrain-encoder`. false: the projection trains (any trunk).
    frozen_projection: bool = False
    # sha256 of the trunk weights file every site must use (`weights_id`); None: no pin (random trunk demos)
    trunk_sha256: str | None = check(lambda h: None if re.fullmatch(r"[0-9a-f]{64}", h) else
                                     "must be 64 lowercase hex digits (the sha256 printed by pretrain-encoder)", None)
    # The trunk whose vectors the head reads (its size is the head's input): inception_v3, or timm:NAME
    # (shared/timm_encoder.py). A site's features.backbone sets it there; the server's says what sites must use.
    backbone: str = check(backbone_rule, INCEPTION)

    def __post_init__(self) -> None:
        if self.trainable == "last_block" and self.mode != "tiles":
            raise SettingError("trainable", "last_block works in mode 'tiles' (a grid sequence is one tile's map)")
        if self.backbone != INCEPTION:
            used = [name for name, on in (("mode: grid", self.mode == "grid"),
                                          ("trainable: last_block", self.trainable == "last_block"),
                                          ("frozen_projection: true", self.frozen_projection)) if on]
            if used:
                raise ValueError(f"model.{', model.'.join(used)} need the {INCEPTION} backbone (its 8x8 map, its last "
                                 f"block, a projection fitted by pretrain-encoder), not {self.backbone}")

    def as_dict(self) -> dict:
        return asdict(self)
