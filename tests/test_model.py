import pytest
import torch

from shared.model import ModelConfig, SequenceHead, build_classifier, build_head, grid_sequence


@pytest.mark.parametrize("core", ["rnn", "lstm", "gru", "mean"])
@pytest.mark.parametrize("classes", [2, 5])
def test_head_shapes(core, classes):
    head = build_head(ModelConfig(core=core, projection=32, hidden=16), classes)
    logits = head(torch.randn(4, 8, 2048))
    assert logits.shape == (4, classes)
    assert (head.core is None) == (core == "mean")


def test_head_ignores_feature_scale():
    head = SequenceHead(2, "rnn", projection=16, hidden=8).eval()
    x = torch.randn(3, 5, 2048)
    torch.testing.assert_close(head(x), head(x * 1e9))  # random trunks emit huge activations


def test_one_class_is_refused():
    with pytest.raises(ValueError, match="at least 2 classes"):
        SequenceHead(1)


@pytest.fixture(scope="module")
def classifier():
    return build_classifier(ModelConfig(core="gru", projection=16, hidden=8), num_classes=3)


def test_classifier_tiles_mode(classifier):
    tiles = torch.randint(0, 256, (2, 3, 3, 96, 96), dtype=torch.uint8)  # 2 slides x 3 tiles
    with torch.no_grad():
        assert classifier(tiles).shape == (2, 3)


def test_classifier_grid_mode():
    model = build_classifier(ModelConfig(core="rnn", mode="grid", projection=16, hidden=8), num_classes=2)
    tile = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    with torch.no_grad():
        assert grid_sequence(model.encoder.feature_map(tile)).shape == (1, 64, 2048)  # the 8x8 map
        assert model(tile).shape == (1, 2)


def test_frozen_trunk_stays_in_eval_mode_while_training(classifier):
    classifier.train()
    assert classifier.head.training and not classifier.encoder.training
    assert not any(m.training for m in classifier.encoder.modules())
    assert not any(p.requires_grad for p in classifier.encoder.parameters())


def test_classifier_refuses_the_last_block_scope():
    with pytest.raises(ValueError, match="build_trainable"):
        build_classifier(ModelConfig(trainable="last_block"), 2)
