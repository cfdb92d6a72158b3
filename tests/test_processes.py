"""shared.processes.is_alive: running, exited and zombie processes, ours and others'."""

import os
import subprocess
import sys
import time

import pytest

from shared.processes import is_alive


def test_running_child_is_alive_and_exited_child_is_reaped():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert is_alive(child.pid)
    finally:
        child.kill()
    deadline = time.monotonic() + 10
    while is_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_alive(child.pid)
    with pytest.raises(ChildProcessError):  # reaped by is_alive, not left a zombie
        os.waitpid(child.pid, 0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="zombie state read from Linux's /proc")
def test_zombie_of_another_parent_has_exited():
    # sh starts `true` in the background, then becomes `sleep`, which never reaps it: a zombie we cannot reap.
    parent = subprocess.Popen(["sh", "-c", "true & echo $!; exec sleep 30"], stdout=subprocess.PIPE, text=True)
    try:
        zombie = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while is_alive(zombie) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_alive(zombie)
        assert is_alive(parent.pid)
    finally:
        parent.kill()
        parent.wait()
