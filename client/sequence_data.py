"""Training and evaluation data from the feature cache: sequences of tile vectors per slide.

In ``tiles`` mode a sequence is a window of consecutive tiles (cached (N, D) vectors); in
``grid`` mode it is one tile's map read as positions (cached (N, P, D)), and a slide's
windows are its tiles. The privacy unit is the patient (each slide is its own patient when the
manifest gives no ids): a training sample is one random window from one of the patient's slides,
so a DP-SGD per-sample gradient is a per-patient gradient and clipping bounds what one patient
can change.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from client.feature_cache import FeatureCache
from client.sequences import evaluation_windows, training_windows
from shared.devices import module_device
from shared.file_memo import FileMemo

# Windows per head call when scoring a whole slide: all of them at once copied every window and held the head's
# activations over them, memory that grows with the slide (0.05 GB at 7,273 tiles; `predict`, evaluation).
WINDOWS_PER_CALL = 256

# Training vectors kept on a GPU between rounds by a long-lived process (the site's task runner): a round
# after the first copies only what `prepare` changed to the device, not the whole training set. Sized from
# the device's memory (feature_cache.WARM_DEVICE_SHARE) at first use. One call (one split: training or
# validation) puts at most that many bytes on the device, so a round at most twice that; the rest stays on
# the host and is copied per batch, as without it, so a training set larger than the GPU still trains.
# Never on the CPU, where a tensor over the cached array is free.
DEVICE_ENTRIES = FileMemo(max_bytes=0, size_of=lambda tensor: tensor.numel() * tensor.element_size())


@dataclass(frozen=True)
class SlideFeatures:
    item_id: str
    patient: str
    label: int
    # (N, 2048) float32 in spatial order, or (N, P, 2048) maps in grid mode; a torch tensor when it is
    # kept on the training device (DEVICE_ENTRIES)
    features: np.ndarray | torch.Tensor

    @property
    def grid(self) -> bool:
        return self.features.ndim == 3


def load_split(cache: FeatureCache, split: str,
               device: torch.device | None = None) -> tuple[list[SlideFeatures], list[str]]:
    """The cached slides of one split, and the class names (model order).

    Args:
        cache: the site's feature cache.
        split: ``train``, ``val`` or ``test``.
        device: keep the vectors on this device between calls, as far as ``DEVICE_ENTRIES`` allows
            (callers pass it only for a GPU); None: host arrays.
    """
    index = cache.read_index()
    if device is not None and not DEVICE_ENTRIES.max_bytes:
        DEVICE_ENTRIES.max_bytes = device_budget(device)
    room = [DEVICE_ENTRIES.max_bytes if device is not None else 0]
    slides = [SlideFeatures(item_id, rec["patient"], index.classes.index(rec["label"]),
                            _kept(cache, rec["key"], device, room))
              for item_id, rec in sorted(index.items.items()) if rec["split"] == split]
    return slides, index.classes


def device_budget(device: torch.device) -> int:
    """Bytes of ``device`` for kept vectors: ``WARM_DEVICE_SHARE`` of its memory (0 for a CPU, or when off)."""
    from client import feature_cache

    if not feature_cache.WARM_DEVICE_SHARE or device.type != "cuda":
        return 0
    return int(feature_cache.WARM_DEVICE_SHARE * torch.cuda.get_device_properties(device).total_memory)


def _kept(cache: FeatureCache, key: str, device: torch.device | None, room: list[int]) -> np.ndarray | torch.Tensor:
    """The entry's vectors: on ``device`` (kept there between calls) while this call's ``room`` lasts,
    else the host array."""
    host = cache.load(key).features
    if device is None or host.nbytes > room[0]:
        return host
    room[0] -= host.nbytes
    return DEVICE_ENTRIES.get(cache.path_for(key), lambda _: torch.from_numpy(host).to(device), kind=str(device))


def as_tensor(features: np.ndarray | torch.Tensor) -> torch.Tensor:
    return features if isinstance(features, torch.Tensor) else torch.from_numpy(features)


class PatientSequences(Dataset):
    """One sample per patient: a random window of ``length`` tiles from one of their slides."""

    def __init__(self, slides: list[SlideFeatures], length: int, seed: int = 0):
        by_patient: dict[str, list[SlideFeatures]] = defaultdict(list)
        for slide in slides:
            by_patient[slide.patient].append(slide)
        self.units = [by_patient[p] for p in sorted(by_patient)]
        self.length = length
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        slides = self.units[index]
        slide = slides[self.rng.integers(len(slides))]
        if slide.grid:
            return as_tensor(slide.features[int(self.rng.integers(len(slide.features)))]), slide.label
        window = training_windows(len(slide.features), self.length, 1, self.rng)[0]
        return as_tensor(slide.features[window]), slide.label


def slide_windows(slide: SlideFeatures, length: int) -> torch.Tensor:
    """[K, length, D]: the fixed windows covering every tile of the slide (grid mode: its tiles' maps)."""
    if slide.grid:
        return as_tensor(slide.features)
    return as_tensor(slide.features[evaluation_windows(len(slide.features), length)])


@torch.inference_mode()
def window_probabilities(head: nn.Module, slide: SlideFeatures, length: int) -> torch.Tensor:
    """[K, classes]: the head's class probabilities for each of the slide's covering windows (on the CPU,
    wherever the head computes), ``WINDOWS_PER_CALL`` windows at a time."""
    head.eval()
    device = module_device(head)
    if slide.grid:  # a window is a tile's map
        chunks = (slide.features[i:i + WINDOWS_PER_CALL] for i in range(0, len(slide.features), WINDOWS_PER_CALL))
    else:
        windows = evaluation_windows(len(slide.features), length)
        chunks = (slide.features[windows[i:i + WINDOWS_PER_CALL]] for i in range(0, len(windows), WINDOWS_PER_CALL))
    return torch.cat([torch.softmax(head(as_tensor(chunk).to(device)), dim=-1).cpu() for chunk in chunks])


def predict_slides(head: nn.Module, slides: list[SlideFeatures], length: int) -> np.ndarray:
    """Class probabilities per slide: the mean over windows that cover the whole slide."""
    probs = [window_probabilities(head, slide, length).mean(dim=0).numpy() for slide in slides]
    return np.stack(probs) if probs else np.zeros((0, 0), dtype=np.float32)
