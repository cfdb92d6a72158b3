"""shared.checkpoints: exact round-trips, latest/best copies, and refusal of anything tampered with."""

import hashlib
import json

import numpy as np
import pytest

from shared.checkpoints import (
    CheckpointError,
    card_path,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Names deliberately not in alphabetical order; ``file`` would clash with np.savez's argument."""
    rng = np.random.default_rng(seed)
    return {
        "encoder.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "attention.bias": rng.standard_normal(5),  # float64
        "file": np.arange(6, dtype=np.int64).reshape(2, 3),
        "classifier.scale": np.full((), seed + 0.5, dtype=np.float16),  # 0-d
    }


def _save(run_dir, rnd, best=False, seed=None):
    card = {"sites": ["a", "b"], "metrics": {"auc": float("nan"), "loss": 0.5}, "audit_last_hash": "f" * 64}
    return save_checkpoint(run_dir, rnd, _arrays(rnd if seed is None else seed), card, best=best)


def test_round_trip_keeps_values_order_and_dtypes(tmp_path):
    path = _save(tmp_path, 3)
    assert path == tmp_path / "checkpoints" / "round-0003.npz"
    loaded = load_checkpoint(path)
    expected = _arrays(3)
    assert loaded.round == 3 and loaded.path == path
    assert list(loaded.arrays) == list(expected)
    for name, array in expected.items():
        assert loaded.arrays[name].dtype == array.dtype
        assert loaded.arrays[name].shape == array.shape
        np.testing.assert_array_equal(loaded.arrays[name], array)


def test_card_describes_the_file(tmp_path):
    path = _save(tmp_path, 3)
    card = json.loads(card_path(path).read_text())
    assert card_path(path) == tmp_path / "checkpoints" / "round-0003.json"
    assert card["round"] == 3 and card["checkpoint_file"] == "round-0003.npz"
    assert card["checkpoint_sha256"] == sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["parameters"][0] == {"name": "encoder.weight", "shape": [4, 3], "dtype": "float32"}
    assert [entry["name"] for entry in card["parameters"]] == list(_arrays())
    assert card["metrics"] == {"auc": None, "loss": 0.5}  # nan stored as null
    assert card["sites"] == ["a", "b"] and card["audit_last_hash"] == "f" * 64
    assert load_checkpoint(path).card == card


def test_latest_and_best_copies(tmp_path):
    folder = tmp_path / "checkpoints"
    first = _save(tmp_path, 1, best=True)
    second = _save(tmp_path, 2, best=False)
    assert (folder / "latest.npz").read_bytes() == second.read_bytes()
    assert (folder / "latest.json").read_text() == card_path(second).read_text()
    assert (folder / "best.npz").read_bytes() == first.read_bytes()
    assert json.loads((folder / "best.json").read_text())["checkpoint_file"] == "round-0001.npz"
    assert load_checkpoint(folder / "latest.npz").round == 2
    assert load_checkpoint(folder / "best.npz").round == 1
    _save(tmp_path, 3, best=True)
    assert load_checkpoint(folder / "best.npz").round == 3


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for rnd in (1, 2, 10):
        _save(tmp_path, rnd)
    latest = latest_checkpoint(tmp_path)
    assert latest is not None and latest.round == 10
    np.testing.assert_array_equal(latest.arrays["encoder.weight"], _arrays(10)["encoder.weight"])


def test_interrupted_save_is_skipped_by_latest_checkpoint(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    card_path(tmp_path / "checkpoints" / "round-0002.npz").unlink()  # killed between npz and card
    assert latest_checkpoint(tmp_path).round == 1


def test_tampered_npz_byte_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    expected = json.loads(card_path(path).read_text())["checkpoint_sha256"]
    actual = sha256_file(path)
    with pytest.raises(CheckpointError, match=rf"round-0001.npz.*expected sha256 {expected}, actual {actual}"):
        load_checkpoint(path)


def test_replaced_npz_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    other = _save(tmp_path / "other", 1, seed=99)
    path.write_bytes(other.read_bytes())
    with pytest.raises(CheckpointError, match="does not match its model card"):
        load_checkpoint(path)


def test_edited_card_sha_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    card = json.loads(card_path(path).read_text())
    card["checkpoint_sha256"] = "0" * 64
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"expected sha256 0{64}, actual"):
        load_checkpoint(path)


def test_card_parameter_list_must_match_arrays(tmp_path):
    path = _save(tmp_path, 1)
    card = json.loads(card_path(path).read_text())
    card["parameters"][0]["shape"] = [3, 4]
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"'encoder.weight' is float32 \[4, 3\] in the file but float32 \[3, 4\]"):
        load_checkpoint(path)
    card["parameters"] = card["parameters"][1:]
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"not in the card \['encoder.weight'\]"):
        load_checkpoint(path)


def test_missing_or_unreadable_card_is_refused(tmp_path):
    path = _save(tmp_path, 1)
    card_path(path).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model card .*round-0001.json is unreadable"):
        load_checkpoint(path)
    card_path(path).write_text(json.dumps({"round": 1}))
    with pytest.raises(CheckpointError, match="not a checkpoint card: it lacks"):
        load_checkpoint(path)
    card_path(path).unlink()
    with pytest.raises(CheckpointError, match=r"round-0001.npz has no model card"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "checkpoints" / "round-0009.npz")


def test_invalid_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="object"):
        save_checkpoint(tmp_path, 1, {"w": np.array([{}, None])}, {}, best=False)
    with pytest.raises(ValueError, match="must not set"):
        save_checkpoint(tmp_path, 1, _arrays(), {"round": 5}, best=False)
    with pytest.raises(ValueError, match="non-negative integer"):
        save_checkpoint(tmp_path, -1, _arrays(), {}, best=False)
    assert not (tmp_path / "checkpoints").exists()
