"""`python -m benchmarks`: the options it takes and what it refuses (no benchmark is run here)."""

import pytest

from benchmarks.__main__ import available, main


def test_device_goes_only_to_benchmarks_that_take_it():
    assert {"features", "predict"} <= set(available())
    with pytest.raises(SystemExit, match="benchmarks/tiling.py has no --device option"):
        main(["tiling", "--device", "cuda"])


def test_device_with_all_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["all", "--device", "cuda"])
    assert "--device goes with one benchmark" in capsys.readouterr().err
