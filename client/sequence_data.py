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


@dataclass(frozen=True)
class SlideFeatures:
    item_id: str
    patient: str
    label: int
    features: np.ndarray  # (N, 2048) float32 in spatial order, or (N, P, 2048) maps in grid mode

    @property
    def grid(self) -> bool:
        return self.features.ndim == 3


def load_split(cache: FeatureCache, split: str) -> tuple[list[SlideFeatures], list[str]]:
    """The cached slides of one split, and the class names (model order)."""
    index = cache.read_index()
    slides = [SlideFeatures(item_id, rec["patient"], index.classes.index(rec["label"]), cache.load(rec["key"]).features)
              for item_id, rec in sorted(index.items.items()) if rec["split"] == split]
    return slides, index.classes


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
            return torch.from_numpy(slide.features[self.rng.integers(len(slide.features))]), slide.label
        window = training_windows(len(slide.features), self.length, 1, self.rng)[0]
        return torch.from_numpy(slide.features[window]), slide.label


def slide_windows(slide: SlideFeatures, length: int) -> torch.Tensor:
    """[K, length, D]: the fixed windows covering every tile of the slide (grid mode: its tiles' maps)."""
    if slide.grid:
        return torch.from_numpy(slide.features)
    return torch.from_numpy(slide.features[evaluation_windows(len(slide.features), length)])


@torch.inference_mode()
def window_probabilities(head: nn.Module, slide: SlideFeatures, length: int) -> torch.Tensor:
    """[K, classes]: the head's class probabilities for each of the slide's covering windows (on the CPU,
    wherever the head computes)."""
    head.eval()
    windows = slide_windows(slide, length).to(module_device(head))
    return torch.softmax(head(windows), dim=-1).cpu()


def predict_slides(head: nn.Module, slides: list[SlideFeatures], length: int) -> np.ndarray:
    """Class probabilities per slide: the mean over windows that cover the whole slide."""
    probs = [window_probabilities(head, slide, length).mean(dim=0).numpy() for slide in slides]
    return np.stack(probs) if probs else np.zeros((0, 0), dtype=np.float32)
