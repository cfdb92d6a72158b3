"""The parameter wire format: the trainable tensors of a model as an ordered list of arrays.

Both sides agree on the order (the head's ``state_dict`` order) and the server checks names
and shapes from the same place, so a site that built another model variant is refused
instead of silently averaged into the wrong tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from torch import nn


class ParameterMismatch(ValueError):
    """Arrays that do not fit the model they are meant for."""


def model_arrays(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Name -> float32 copy of every tensor that travels (the module's state, in order)."""
    return OrderedDict((name, tensor.detach().cpu().numpy().astype(np.float32, copy=True))
                       for name, tensor in model.state_dict().items())


def check_shapes(expected: Sequence[tuple[str, tuple[int, ...]]], arrays: Sequence[np.ndarray]) -> None:
    """Raise ParameterMismatch naming the first tensor whose shape is wrong, or a wrong count."""
    if len(arrays) != len(expected):
        raise ParameterMismatch(f"expected {len(expected)} parameter arrays, got {len(arrays)}")
    for (name, shape), array in zip(expected, arrays, strict=True):
        if tuple(array.shape) != tuple(shape):
            raise ParameterMismatch(f"parameter '{name}': expected shape {tuple(shape)}, got {tuple(array.shape)}")


def update_problem(expected: Sequence[tuple[str, tuple[int, ...]]], update: Sequence[np.ndarray],
                   max_norm: float, value_range: float | None = None) -> str | None:
    """Why an update must not be used (wrong shapes, non-finite, L2 norm above ``max_norm``, a value
    outside ±``value_range``), or None. Sites check before sending, the server before averaging."""
    try:
        check_shapes(expected, update)
    except ParameterMismatch as exc:
        return str(exc)
    for (name, _), array in zip(expected, update, strict=True):
        if not np.all(np.isfinite(array)):
            return f"parameter '{name}' has non-finite values"
    norm = float(np.sqrt(sum(float(np.square(np.asarray(a, dtype=np.float64)).sum()) for a in update)))
    if norm > max_norm:
        return f"update L2 norm {norm:.4g} exceeds the bound {max_norm:g} (federation.max_update_norm)"
    if value_range is not None:
        largest = max((float(np.abs(a).max()) for a in update if np.size(a)), default=0.0)
        if largest > value_range:
            return (f"largest update value {largest:.4g} is outside secure aggregation's range ±{value_range:g}; "
                    "it would be clipped silently (secure_aggregation.clipping_range)")
    return None


def load_arrays(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Put ``arrays`` (wire order) into ``model``; shapes are checked first."""
    state = model.state_dict()
    check_shapes([(name, tuple(t.shape)) for name, t in state.items()], arrays)
    model.load_state_dict(OrderedDict(
        (name, torch.from_numpy(np.asarray(array, dtype=np.float32)).to(state[name].dtype))
        for name, array in zip(state, arrays, strict=True)))


def subtract(new: Sequence[np.ndarray], old: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)
            for a, b in zip(new, old, strict=True)]


def add(base: Sequence[np.ndarray], update: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(a, dtype=np.float32) + np.asarray(b, dtype=np.float32)
            for a, b in zip(base, update, strict=True)]
