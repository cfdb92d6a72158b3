import numpy as np
import pytest

from client.feature_cache import CachedFeatures, CacheError, FeatureCache, cache_key, content_sha256
from client.slides import SlideError


def entry(n=3):
    return CachedFeatures(np.arange(n * 4, dtype=np.float32).reshape(n, 4), np.zeros((n, 2), np.int64),
                          np.ones((n, 2), np.int64), {"item_id": "a", "tiles": n})


def test_key_changes_with_each_ingredient():
    base = cache_key("c", "b", {"tile_size": 299})
    assert base == cache_key("c", "b", {"tile_size": 299})
    assert len({base, cache_key("c2", "b", {"tile_size": 299}), cache_key("c", "b2", {"tile_size": 299}),
                cache_key("c", "b", {"tile_size": 149})}) == 4


def test_content_hash_follows_bytes_not_names(tmp_path):
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"x" * 10)
    assert content_sha256([a]) == content_sha256([b])  # a renamed or copied slide is the same slide
    before = content_sha256([a])
    a.write_bytes(b"x" * 9 + b"y")
    assert content_sha256([a]) != before
    with pytest.raises(SlideError, match="file not found"):
        content_sha256([tmp_path / "gone.tif"])


def test_save_load_round_trip_and_meta_only(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.save("k", entry())
    loaded = cache.load("k")
    np.testing.assert_array_equal(loaded.features, entry().features)
    assert cache.meta("k") == {"item_id": "a", "tiles": 3}
    assert not list(tmp_path.rglob("*.tmp"))  # nothing half-written left behind


def test_damaged_and_missing_entries_say_what_to_do(tmp_path):
    cache = FeatureCache(tmp_path)
    with pytest.raises(CacheError, match="fedpath-site prepare"):
        cache.load("nothing")
    cache.path_for("bad").parent.mkdir(parents=True)
    cache.path_for("bad").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CacheError, match="damaged cache entry"):
        cache.load("bad")


def test_interrupted_write_leaves_old_entry(tmp_path):
    cache = FeatureCache(tmp_path)
    cache.save("k", entry(3))

    class Boom(Exception):
        pass

    bad = entry(5)
    object.__setattr__(bad, "features", _Exploding(Boom))
    with pytest.raises(Boom):
        cache.save("k", bad)
    assert len(cache.load("k")) == 3
    assert not list(tmp_path.rglob("*.tmp"))


class _Exploding:
    dtype = np.dtype(np.float32)

    def __init__(self, error):
        self.error = error

    def astype(self, *args, **kwargs):
        raise self.error()
