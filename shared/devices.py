"""Where torch computes: the hospital's GPU when it has one, the CPU otherwise, with one set of rules.

Every command that runs the trunk or trains (``prepare``, ``predict``, ``train-local``, the ClientApp's
rounds, ``pretrain-encoder``) reads ``features.device`` and resolves it here, so ``auto`` means the
same everywhere and a site that asks for a GPU it does not have is told so before any slide is read.

On CUDA the frozen trunk runs under autocast (bfloat16 where the GPU supports it, else float16): the
vectors come out as float32 and are cached as today. Cached vectors carry no mark of the device that
computed them; ``tests/test_devices.py`` bounds how far bfloat16 moves them (compared on the CPU, where
torch has bfloat16 autocast too). Training the head stays in float32 on every device: DP-SGD clips and
adds noise to gradients, and half precision would change what the noise is calibrated against.

A batch that runs out of GPU memory is split in halves and retried (``ShrinkingBatches``), and later
batches keep the smaller size, so a busy GPU slows ``prepare`` down instead of failing a slide.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator

import torch

from shared.errors import UserError
from shared.model_config import device_rule

log = logging.getLogger("fedpath.device")

# Tiles per trunk batch on a CPU: measured here (299 px, 2 threads), 16 was the fastest (11.3 tiles/s against
# 10.8 at 32 and 10.6 at 8) and holds 0.26 GB less than 32 at the peak (benchmarks/slide_scale.py).
CPU_BATCH = 16
GPU_BATCH_MAX = 256  # what `batch_size: auto` starts from on a GPU, before it fits the free memory
# The trunk's inference memory per 299-px tile under autocast, measured upper bound with headroom
# (activations of the widest InceptionV3 blocks); scaled with the tile's area for other sizes.
GPU_BYTES_PER_TILE_299 = 48 * 2**20


class DeviceError(UserError, RuntimeError):
    """A device setting this machine cannot honour, with what to do about it."""


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device ``spec`` names on this machine.

    Args:
        spec: ``auto`` (the first CUDA GPU, else Apple's ``mps``, else the CPU), ``cpu``, ``cuda``,
            ``cuda:N`` or ``mps``.

    Raises:
        DeviceError: the device is not there (no CUDA build or driver, no such GPU index, no MPS),
            naming what torch sees.
    """
    problem = device_rule(spec)
    if problem:
        raise DeviceError(f"features.device: {spec!r} {problem}")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
            raise DeviceError(f"features.device: {spec}, but torch sees no CUDA GPU (torch {torch.__version__}, "
                              f"{build}; is the NVIDIA driver loaded?); set features.device: auto or cpu")
        index = int(spec.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DeviceError(f"features.device: {spec}, but this machine has {torch.cuda.device_count()} CUDA "
                              f"GPU(s), numbered from 0")
        return torch.device("cuda", index)
    if spec == "mps" and not _mps_available():
        raise DeviceError("features.device: mps, but torch has no Apple MPS backend here; set features.device: "
                          "auto or cpu")
    return torch.device(spec)


def use_threads(threads: int) -> None:
    """Give torch ``threads`` CPU threads in this process (``features.threads``; 0 keeps torch's default,
    one per core).

    Processes that share a machine must share its cores: three sites on one 2-core machine, each with
    torch's two threads, trained their heads 5 to 20 times slower than with one thread each, because
    idle OpenMP threads spin for work on cores the other sites need (2026-12-04, 30 DP epochs of
    batch 2: 8 to 33 s a round against 0.9 to 1.6 s). Alone on the machine, two threads trained the
    head only 5 to 10 % faster than one.
    """
    if threads:
        torch.set_num_threads(threads)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: the device of its first parameter, or buffer (a frozen trunk may have
    only buffers); the CPU for a module with neither."""
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision the frozen trunk runs in on ``device``: bfloat16 on GPUs that support it,
    float16 on older ones and on MPS, None (float32) on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


def trunk_precision(device: torch.device, dtype: torch.dtype | None = None) -> contextlib.AbstractContextManager:
    """The context the frozen trunk runs in: autocast to ``dtype`` (default ``autocast_dtype(device)``),
    or nothing at float32."""
    dtype = dtype or autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def trunk_batch_size(setting: int | str, device: torch.device, tile_size: int) -> int:
    """Tiles per trunk batch: the configured number, or for ``auto`` what fits the device's free memory
    (``GPU_BYTES_PER_TILE_299`` per 299-px tile, at most ``GPU_BATCH_MAX``; ``CPU_BATCH`` on a CPU)."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return CPU_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    per_tile = GPU_BYTES_PER_TILE_299 * (tile_size / 299) ** 2
    return max(1, min(GPU_BATCH_MAX, int(free * 0.8 // per_tile)))


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's out-of-memory error (CUDA or MPS), whatever wraps it."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class ShrinkingBatches:
    """Runs a function over batches, halving the batch after an out-of-memory error and keeping the
    smaller size for every later batch; a single item that does not fit is a real error.

    Args:
        run: the work for one batch, returning a tensor with the batch along dimension 0.
        limit: the largest batch to try (None: as the batches come).
    """

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], limit: int | None = None) -> None:
        self.run, self.limit, self.shrunk = run, limit, 0

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        size = len(batch) if self.limit is None else min(self.limit, len(batch))
        pieces = list(self._pieces(batch, max(1, size)))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # the usual case copies nothing

    def _pieces(self, batch: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
        start = 0
        while start < len(batch):
            piece = batch[start:start + size]
            try:
                out = self.run(piece)
            except Exception as exc:
                if not is_out_of_memory(exc) or len(piece) == 1:
                    raise
                size = max(1, len(piece) // 2)
                self.limit, self.shrunk = size, self.shrunk + 1
                log.warning("out of memory at %d tiles per batch: retrying at %d", len(piece), size)
                _free_cached_memory()
                continue
            start += len(piece)
            yield out


def _free_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
