import numpy as np
import pytest

from client.sequences import evaluation_windows, training_windows


def test_evaluation_windows_cover_every_tile_deterministically():
    windows = evaluation_windows(n_tiles=21, length=8)
    assert windows.shape == (3, 8)
    assert set(windows.ravel()) == set(range(21))
    assert windows[-1].tolist() == list(range(13, 21))  # last window aligned to the end
    assert np.array_equal(windows, evaluation_windows(21, 8))


def test_short_slide_wraps_around():
    assert evaluation_windows(3, 8).tolist() == [[0, 1, 2, 0, 1, 2, 0, 1]]


def test_exact_multiple_needs_no_overlap():
    assert evaluation_windows(16, 8).tolist() == [list(range(8)), list(range(8, 16))]


def test_training_windows_are_consecutive_and_in_range():
    rng = np.random.default_rng(0)
    windows = training_windows(50, 8, count=200, rng=rng)
    assert windows.shape == (200, 8)
    assert (np.diff(windows, axis=1) == 1).all()
    assert windows.min() >= 0 and windows.max() < 50
    assert len({w[0] for w in windows}) > 20  # starts vary


def test_training_windows_seeded():
    a = training_windows(50, 8, 10, np.random.default_rng(3))
    b = training_windows(50, 8, 10, np.random.default_rng(3))
    assert np.array_equal(a, b)


def test_no_tiles_is_an_error():
    with pytest.raises(ValueError):
        evaluation_windows(0, 8)
