"""simulations.process_tree.paused: a benchmark stops a command's whole process tree and lets it go on."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.processes import descendants, signal_each
from simulations.process_tree import paused

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process states read from /proc")

# Appends a line to its file every 20 ms; given a second argument (code), first starts that code as a child
# writing to "<file>.child" (the test gives it this same code, once: the child has no second argument).
TICKER = """
import subprocess, sys, time
out = open(sys.argv[1], "a", buffering=1)
if len(sys.argv) > 2:
    subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[1] + ".child"])
while True:
    out.write("tick\\n")
    time.sleep(0.02)
"""


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _wait_for(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_whole_tree_stands_still_while_paused_and_goes_on_after_even_when_the_block_raises(tmp_path):
    out = tmp_path / "ticks"
    parent = subprocess.Popen([sys.executable, "-c", TICKER, str(out), TICKER])
    child_out = Path(f"{out}.child")
    try:
        _wait_for(lambda: _lines(out) > 5 and _lines(child_out) > 5)
        child = descendants(parent.pid)
        assert len(child) == 1
        with pytest.raises(RuntimeError, match="measured"), paused(parent.pid) as stopped:
            assert sorted(stopped) == sorted([parent.pid, *child])
            _wait_for(lambda: _state(parent.pid) == "T" and _state(child[0]) == "T")
            before = _lines(out), _lines(child_out)
            time.sleep(0.5)  # 25 ticks each if they were running
            assert (_lines(out), _lines(child_out)) == before
            raise RuntimeError("measured something else meanwhile")
        _wait_for(lambda: _lines(out) > before[0] + 5 and _lines(child_out) > before[1] + 5)
        assert _state(parent.pid) != "T" and _state(child[0]) != "T"
        with paused(parent.pid):  # and when the block ends normally, as in the benchmark
            _wait_for(lambda: _state(parent.pid) == "T" and _state(child[0]) == "T")
            before = _lines(out), _lines(child_out)
        _wait_for(lambda: _lines(out) > before[0] + 5 and _lines(child_out) > before[1] + 5)
    finally:
        signal_each(descendants(parent.pid), signal.SIGKILL)
        parent.kill()
        parent.wait(timeout=60)
