"""`features.device` and the trunk's precision: what a CPU-only machine can check of the GPU path.

The GPU itself is absent here and in CI. What is checked: the setting's validation and refusals, that
``auto`` falls back to the CPU, that ``batch_size: auto`` resolves, that the out-of-memory retry
returns exactly the vectors of an unlimited run, that bfloat16 autocast (the GPU's precision, which
torch also has on the CPU) stays within the stated tolerance of float32, and that the cache does not
depend on the device setting.
"""

import shutil

import numpy as np
import pytest
import torch

from client.cli import main as site_main
from client.features import extract_features, load_encoder
from client.prepare import prepare_site
from client.site_config import load_site_config
from shared.devices import (
    CPU_BATCH,
    DeviceError,
    ShrinkingBatches,
    resolve_device,
    trunk_batch_size,
    trunk_precision,
)
from simulations.public_tiles import make_public_tiles
from tests.conftest import write_site_yaml

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")

# How far the GPU's bfloat16 autocast may move a tile's vector from float32 (docs/performance.md).
BF16_MIN_COSINE = 0.999
BF16_MAX_RELATIVE_L2 = 0.05


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """16 generated H&E tiles of 128 px, as a site's reader hands them over (HWC uint8)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("tiles")
    make_public_tiles(folder, 8, 128)
    return np.stack([np.asarray(Image.open(path).convert("RGB")) for path in sorted(folder.rglob("*.png"))])


def test_cpu_and_auto_resolve_on_a_machine_without_gpu():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_a_gpu_that_is_not_there_is_refused_with_what_torch_sees(spec):
    with pytest.raises(DeviceError, match=rf"features.device: {spec}, but torch sees no CUDA GPU .*auto or cpu"):
        resolve_device(spec)


def test_unknown_device_names_are_refused_at_their_line(tmp_path, capsys):
    path = tmp_path / "site.yaml"
    path.write_text("name: x\ndata:\n  manifest: m.csv\nfeatures:\n  device: gpu0\n  batch_size: none\n")
    assert site_main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:5: features.device: must be auto, cpu, cuda, cuda:N (N = the GPU's index) or mps" in err
    assert f"{path}:6: features.batch_size:" in err


def test_batch_size_auto_is_the_cpu_batch_here_and_a_number_is_kept():
    cpu = torch.device("cpu")
    assert trunk_batch_size("auto", cpu, 299) == CPU_BATCH
    assert trunk_batch_size(7, cpu, 299) == 7


class _SmallMemory:
    """The real trunk behind a memory limit: batches above ``fits`` tiles fail as a GPU out of memory
    does (torch.OutOfMemoryError), the others run. What the retry meets on a busy GPU."""

    def __init__(self, encoder, fits: int):
        self.encoder, self.fits, self.sizes = encoder, fits, []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(batch))
        if len(batch) > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated at {len(batch)} tiles)")
        return self.encoder(batch.permute(0, 3, 1, 2))


def test_out_of_memory_halves_the_batch_keeps_it_small_and_loses_no_tile(tiles):
    encoder = load_encoder("random")
    batch = torch.from_numpy(tiles)
    with torch.inference_mode():
        expected = encoder(batch.permute(0, 3, 1, 2))
        trunk = _SmallMemory(encoder, fits=3)
        retrying = ShrinkingBatches(trunk)
        first = retrying(batch[:8])
        assert trunk.sizes == [8, 4, 2, 2, 2, 2]  # 8 and 4 fail, then pieces of 2 only
        assert retrying.limit == 2 and retrying.shrunk == 2
        second = retrying(batch[8:])
        assert trunk.sizes[6:] == [2, 2, 2, 2]  # later batches start at the size that fitted
    # Pieces of 2 against one batch of 16: other kernels, other rounding. A random trunk's activations reach
    # 1e11 and cancel, so a tile's small entries differ by more than rtol alone allows: atol scales with them.
    torch.testing.assert_close(torch.cat([first, second]), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))


def test_a_single_tile_that_does_not_fit_and_other_errors_are_not_retried(tiles):
    encoder = load_encoder("random")
    batch = torch.from_numpy(tiles[:2])
    with pytest.raises(torch.OutOfMemoryError):
        ShrinkingBatches(_SmallMemory(encoder, fits=0))(batch)
    calls = []

    def broken(piece):
        calls.append(len(piece))
        raise ValueError("a corrupt tile")

    with pytest.raises(ValueError, match="a corrupt tile"):
        ShrinkingBatches(broken)(batch)
    assert calls == [2]


def test_bfloat16_autocast_stays_within_the_stated_tolerance_of_float32(tiles):
    """The GPU runs the trunk in bfloat16; cached vectors must stay interchangeable with a CPU's."""
    encoder = load_encoder("random")
    batch = torch.from_numpy(tiles).permute(0, 3, 1, 2)
    with torch.inference_mode():
        exact = encoder(batch)
        with trunk_precision(torch.device("cpu"), torch.bfloat16):
            reduced = encoder(batch)
    assert reduced.dtype == torch.bfloat16  # autocast really ran the trunk in bfloat16
    reduced = reduced.float()
    cosine = torch.nn.functional.cosine_similarity(exact, reduced, dim=1)
    relative = (exact - reduced).norm(dim=1) / exact.norm(dim=1)
    assert cosine.min() >= BF16_MIN_COSINE and relative.max() <= BF16_MAX_RELATIVE_L2
    assert relative.max() > 0  # it did compute in another precision


def test_extract_features_returns_float32_on_the_cpu_path(tiles):
    vectors = extract_features(load_encoder("random", device="cpu"), list(tiles), batch_size=5, num_workers=0)
    assert vectors.dtype == np.float32 and vectors.shape == (len(tiles), 2048)


def test_the_cache_does_not_depend_on_the_device_setting(tmp_path, generated_manifests):
    folder = tmp_path / "site"
    shutil.copytree(generated_manifests[0].parent, folder)
    site = write_site_yaml(folder, {"manifest": "manifest.csv"}, features={"device": "cpu", "batch_size": 16})
    first = prepare_site(load_site_config(site), progress=False)
    assert first.count("new") == 4
    write_site_yaml(folder, {"manifest": "manifest.csv"}, features={"device": "auto", "batch_size": "auto"})
    second = prepare_site(load_site_config(site), progress=False)
    assert second.count("cached") == 4 and second.new_tiles == 0
