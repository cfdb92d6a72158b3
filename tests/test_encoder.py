import pytest
import torch

from shared.encoder import BLOCK_INPUT, FEATURE_DIM, LAST_BLOCK, TileEncoder, WeightsError, weights_id


@pytest.fixture(scope="module")
def random_encoder():
    return TileEncoder("random").eval()


def test_random_trunk_is_reproducible_and_gives_2048_d(random_encoder):
    tiles = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    with torch.inference_mode():
        a = random_encoder(tiles)
        b = TileEncoder("random").eval()(tiles)
    assert a.shape == (2, FEATURE_DIM)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("transform_input", [False, True])
def test_vectors_and_maps_are_those_of_torchvisions_own_forward(transform_input):
    """block_input, feature_map and the vector match what torchvision's Inception3.forward computes, also
    with the input rescaling of ImageNet weights (transform_input)."""
    encoder = TileEncoder("random").eval()
    encoder.trunk.transform_input = transform_input
    captured = {}
    hooks = [getattr(encoder.trunk, name).register_forward_hook(
        lambda module, inputs, output, name=name: captured.__setitem__(name, output.clone()))
        for name in (BLOCK_INPUT, LAST_BLOCK)]
    tiles = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    with torch.inference_mode():
        pooled = encoder.trunk(encoder.normalize(tiles))  # torchvision's forward; fc is the identity
        for hook in hooks:
            hook.remove()
        torch.testing.assert_close(encoder.block_input(tiles), captured[BLOCK_INPUT], rtol=1e-6, atol=0)
        torch.testing.assert_close(encoder.feature_map(tiles), captured[LAST_BLOCK], rtol=1e-6, atol=0)
        torch.testing.assert_close(encoder(tiles), pooled, rtol=1e-6, atol=0)
    assert set(encoder.state_dict()) == {f"trunk.{key}" for key in encoder.trunk.state_dict()}


def test_local_weights_file_round_trip(tmp_path, random_encoder):
    path = tmp_path / "trunk.pth"
    state = {f"module.{k}": v for k, v in random_encoder.trunk.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, FEATURE_DIM)  # a full classifier checkpoint is fine
    torch.save({"state_dict": state}, path)
    loaded = TileEncoder(path)
    first = next(iter(loaded.trunk.state_dict().values()))
    torch.testing.assert_close(first, next(iter(random_encoder.trunk.state_dict().values())))
    assert weights_id(path) != weights_id("random")
    assert len(weights_id(path)) == 64


def test_bad_weights_files(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found"):
        TileEncoder(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="not a PyTorch weights file"):
        TileEncoder(junk)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(WeightsError, match="does not hold InceptionV3 trunk weights"):
        TileEncoder(other)


def test_offline_imagenet_says_to_use_a_local_file(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    import torchvision.models

    monkeypatch.setattr(torchvision.models, "inception_v3", offline)  # the encoder imports it when building
    with pytest.raises(WeightsError, match="backbone_weights: /path/to/inception_v3.pth"):
        TileEncoder("imagenet")
