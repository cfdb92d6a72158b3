"""shared.file_memo: a value is kept while its file is unchanged, recomputed when the file is rewritten
(atomically, as fedpath writes), bounded in bytes with the least recently used dropped first."""

import os

import numpy as np
import pytest

from shared.atomic_files import atomic_write_bytes
from shared.encoder import weights_id
from shared.file_memo import FileMemo


def _counting(reads):
    def read(path):
        reads.append(path.name)
        return np.frombuffer(path.read_bytes(), dtype=np.uint8).copy()
    return read


def test_kept_while_unchanged_and_read_again_after_an_atomic_rewrite(tmp_path):
    path, reads, memo = tmp_path / "a.bin", [], FileMemo()
    atomic_write_bytes(path, b"one")
    assert bytes(memo.get(path, _counting(reads))) == b"one"
    assert bytes(memo.get(path, _counting(reads))) == b"one"
    assert reads == ["a.bin"] and (memo.hits, memo.misses) == (1, 1)
    stat = os.stat(path)
    atomic_write_bytes(path, b"two")  # same size: a new inode is what tells it apart
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old modification time
    assert bytes(memo.get(path, _counting(reads))) == b"two"
    assert reads == ["a.bin", "a.bin"]


def test_bounded_in_bytes_least_recently_used_first(tmp_path):
    memo, reads = FileMemo(max_bytes=10), []
    for name in "abc":
        atomic_write_bytes(tmp_path / name, b"x" * 4)
    memo.get(tmp_path / "a", _counting(reads))
    memo.get(tmp_path / "b", _counting(reads))
    memo.get(tmp_path / "a", _counting(reads))  # a is now the most recent
    memo.get(tmp_path / "c", _counting(reads))  # 12 bytes > 10: b goes
    assert memo.bytes == 8 and len(memo) == 2
    memo.get(tmp_path / "a", _counting(reads))
    memo.get(tmp_path / "b", _counting(reads))
    assert reads == ["a", "b", "c", "b"]
    atomic_write_bytes(tmp_path / "big", b"x" * 11)
    memo.get(tmp_path / "big", _counting(reads))
    assert len(memo) <= 2 and memo.bytes <= 10  # larger than the bound: returned, never kept


def test_a_missing_or_unreadable_file_keeps_nothing(tmp_path):
    memo = FileMemo()
    with pytest.raises(FileNotFoundError):
        memo.get(tmp_path / "absent", _counting([]))
    (tmp_path / "bad").write_bytes(b"?")

    def broken(path):
        raise ValueError("damaged")

    with pytest.raises(ValueError, match="damaged"):
        memo.get(tmp_path / "bad", broken)
    assert len(memo) == 0


def test_the_trunk_pin_sees_a_replaced_weights_file(tmp_path):
    path = tmp_path / "trunk.pth"
    atomic_write_bytes(path, b"trunk one")
    first = weights_id(path)
    atomic_write_bytes(path, b"trunk two")
    assert weights_id(path) != first and weights_id(path) == weights_id(path)


def test_the_feature_cache_keeps_nothing_outside_the_task_runner():
    """`predict` over many cached slides must not hold them all: only the runner turns the memory on."""
    import subprocess
    import sys

    code = ("from client.feature_cache import WARM_ENTRIES; import client.task_runner as runner; "
            "print(WARM_ENTRIES.max_bytes, runner.WARM_CACHE_BYTES)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["0", str(4 << 30)]
