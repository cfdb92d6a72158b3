"""shared.processes.is_alive: running, exited and zombie processes, ours and others'."""

import os
import subprocess
import sys
import time

import pytest

from shared.processes import descendants, is_alive, stop_pid


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
        parent.wait(timeout=60)


def test_stopping_a_process_stops_its_descendants_in_sessions_of_their_own(tmp_path):
    """Like the SuperLink, whose SuperExec runs in a session of its own and launches ServerApps that
    would outlive both (and reconnect to the next SuperLink): stop_pid stops the whole tree."""
    pids = tmp_path / "pids"
    grandchild = "import time; time.sleep(120)"
    child = ("import subprocess, sys, time; "
             f"p = subprocess.Popen([sys.executable, '-c', {grandchild!r}]); "
             f"open({str(pids)!r}, 'w').write(f'{{p.pid}}\\n'); time.sleep(120)")
    parent = ("import subprocess, sys, time; "
              f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True); time.sleep(120)")
    leader = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True)
    tree: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not pids.exists() or not pids.read_text().endswith("\n"):
            assert time.monotonic() < deadline, "the tree did not start"
            time.sleep(0.1)
        tree = descendants(leader.pid)
        assert len(tree) == 2 and int(pids.read_text()) in tree
        assert os.getsid(tree[0]) != os.getsid(leader.pid)  # the child runs in a session of its own
        assert stop_pid(leader.pid, timeout=10)
        assert not any(is_alive(pid) for pid in [leader.pid, *tree])
    finally:  # whatever failed above: the whole tree, as far as it started
        for pid in [*{*tree, *descendants(leader.pid)}, leader.pid]:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        leader.wait(timeout=30)


def test_a_pid_file_whose_pid_another_process_has_now_is_neither_running_nor_stopped(tmp_path):
    """After a crash or a reboot the pid in a pid file may belong to another process (the admin's shell, when
    fedpath runs as that user or as root): `start` must not refuse for it and `stop` must not kill its group."""
    from shared.processes import recorded_pid, running_pid, start, stop, write_pid

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        pid_file = tmp_path / "superlink.pid"
        write_pid(pid_file, bystander.pid)
        assert running_pid(pid_file) == bystander.pid == recorded_pid(pid_file)  # the process it names: running
        fields = pid_file.read_text().split()
        pid_file.write_text(f"{fields[0]} {int(fields[1]) - 1}\n")  # the same pid, started at another time
        assert running_pid(pid_file) is None and recorded_pid(pid_file) is None
        assert stop(pid_file) is None and is_alive(bystander.pid)  # not signalled; the stale file is removed
        assert not pid_file.exists()
        pid_file.write_text(f"{fields[0]} {int(fields[1]) - 1}\n")
        process = start([sys.executable, "-c", "import time; time.sleep(120)"], tmp_path / "x.log", pid_file, {},
                        "the SuperLink")  # not refused as "already running"; the bystander's group left alone
        try:
            assert is_alive(bystander.pid) and recorded_pid(pid_file) == process.pid
        finally:
            assert stop(pid_file) == process.pid
        pid_file.write_text(f"{bystander.pid}\n")  # a pid file of an older version (no start time): trusted
        assert running_pid(pid_file) == bystander.pid
    finally:
        bystander.kill()
        bystander.wait(timeout=30)
