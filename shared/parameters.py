"""The parameter wire format: the trainable tensors of a model, in order, as one float32 vector.

Both sides agree on the order (the head's ``state_dict`` order) and on the shapes, which come
from the model the round plan names, so a site that built another model variant is refused
(its vector has another length) instead of silently averaged into the wrong tensors.

Why one vector (``pack``/``unpack``) and not one array per tensor: Flower 1.42 sends every array
of a message as objects of its own (the array and its chunk), each one request through the
proxy to the SuperLink and one more to whoever pulls it. A model of nine tensors made a reply
of ~27 objects; packed, it is ~9 (``benchmarks/round_overhead.py``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from torch import nn


class ParameterMismatch(ValueError):
    """Arrays that do not fit the model they are meant for."""


def pack(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``arrays`` as the wire sends them: one float32 vector (their values in order, flattened)."""
    return [np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays])] if len(arrays) else []


def unpack(arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]],
           what: str = "the model") -> list[np.ndarray]:
    """Split the wire vector (or any arrays holding the values in order) into ``shapes``;
    ParameterMismatch when the number of values differs."""
    flat = np.concatenate([np.asarray(a).ravel() for a in arrays]) if len(arrays) else np.zeros(0, np.float32)
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    if flat.size != sum(sizes):
        raise ParameterMismatch(f"received {flat.size} values, {what} has {sum(sizes)} in {len(shapes)} tensors: "
                                "server and site build different models (another model, class list or version)")
    parts = np.split(flat, np.cumsum(sizes)[:-1]) if shapes else []
    return [part.reshape(shape) for part, shape in zip(parts, shapes, strict=True)]


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
