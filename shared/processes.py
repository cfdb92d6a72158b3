"""Starting and stopping fedpath's long-running processes (SuperLink, its proxy, SuperNode) the
same way everywhere: offline-safe environment, a log file, a pid file, bounded waits, stop by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Collection, Iterator, Sequence

from shared.errors import UserError


class ProcessError(UserError):
    pass


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """Environment for Flower commands: no telemetry, no update check, no package installs at run
    time (hospitals are offline), and this Python's scripts first on PATH (Flower starts its
    helper processes by name)."""
    env = dict(os.environ)
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def executable(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def running_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` if that process is alive, else None."""
    pid = _read_pid(pid_file)
    return pid if pid is not None and is_alive(pid) else None


def start(command: Sequence[str], log_file: Path, pid_file: Path, env: dict[str, str], what: str,
          ready_port: tuple[str, int] | None = None, ready_timeout: float = 60.0,
          pass_fds: Sequence[int] = ()) -> subprocess.Popen:
    """Start ``command`` in its own session with output to ``log_file``; write ``pid_file``;
    wait (bounded) until ``ready_port`` accepts connections. Refuses a second copy. ``pass_fds``:
    descriptors the process inherits (a listening socket bound by the caller)."""
    pid = running_pid(pid_file)
    if pid is not None:
        raise ProcessError(f"{what} is already running (pid {pid}, {pid_file}); stop it first")
    stale = _read_pid(pid_file)
    if stale is not None:  # its leader died: clear what is left of its process group
        _signal_group(stale, signal.SIGKILL)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, pass_fds=tuple(pass_fds))
    write_pid(pid_file, process.pid)
    if ready_port is None:
        return process
    deadline = time.monotonic() + ready_timeout
    try:
        while not port_open(*ready_port):
            if process.poll() is not None or time.monotonic() > deadline:
                state = f"exited with code {process.returncode}" if process.returncode is not None else \
                    f"did not listen on {ready_port[0]}:{ready_port[1]} within {ready_timeout:g} s"
                raise ProcessError(f"{what} {state}; last lines of {log_file}:\n{tail(log_file)}")
            time.sleep(0.2)
    except BaseException:  # not ready, or Ctrl-C while waiting: nothing half-started is left behind
        stop_pid(process.pid)
        pid_file.unlink(missing_ok=True)
        raise
    return process


def stop_pid(pid: int, timeout: float = 15.0) -> bool:
    """SIGTERM the process group of ``pid`` and its descendants, wait for its leader, then SIGKILL
    what is left (Flower's helper processes outlive a SuperNode that exits); True if the leader ran.

    Descendants are found outside the group too: the SuperLink starts its SuperExec in a session of
    its own, and the ServerApps that SuperExec launches outlive both and reconnect to the next
    SuperLink on the same port."""
    was_running = is_alive(pid)
    family = descendants(pid)
    # One SIGTERM each: the group's members get the group's, the others (in sessions of their own) their own.
    # Flower's processes take a SIGTERM as a graceful exit and reset the handler: a second one that comes after
    # the first was handled kills them before they finish it (a SuperNode then does not sign off at the
    # SuperLink; the site supervisor's own second SIGTERM did that in 2 stops of 3, client/supernode.py).
    signal_each([p for p in family if _group_of(p) != pid], signal.SIGTERM)
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_group(pid, signal.SIGKILL)
    is_alive(pid)  # reap it if it is our child
    kill_leftovers(family, max(0.0, deadline - time.monotonic()))
    return was_running


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children...), whatever their session; [] where
    there is no /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:  # the parent pid is the second field after the parenthesised command name (which may hold spaces)
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_leftovers(pids: list[int], timeout: float = 10.0) -> None:
    """Give processes already asked to stop up to ``timeout`` seconds to end, then SIGKILL those still alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(is_alive(p) for p in pids):
        time.sleep(0.1)
    signal_each([p for p in pids if is_alive(p)], signal.SIGKILL)


def signal_each(pids: list[int], signum: int) -> None:
    """Send ``signum`` to each of ``pids``; those gone meanwhile are skipped."""
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def stop(pid_file: Path) -> int | None:
    """Stop the process group named in ``pid_file``; its pid, or None if none was recorded."""
    pid = _read_pid(pid_file)
    if pid is not None:
        stop_pid(pid)
    pid_file.unlink(missing_ok=True)
    return pid


WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def connect_host(host: str) -> str:
    """Where to connect to reach a listener bound to ``host`` from this machine: a wildcard bind
    (0.0.0.0, ::, empty) is not an address one can connect to, its loopback is."""
    return WILDCARD_HOSTS.get(host, host)


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at ``host:port`` (a wildcard host: on loopback)."""
    try:
        with socket.create_connection((connect_host(host), port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_first_exit(processes: Sequence[tuple[str, subprocess.Popen]], poll: float = 0.5,
                    signals: StopSignals | None = None) -> tuple[str, int]:
    """Block until one of ``processes`` exits; its name and exit code. Processes that run as one
    unit (the SuperLink and its proxy) are waited for together, so neither is left alone. A stop
    request recorded in ``signals`` raises KeyboardInterrupt here, between two polls."""
    while True:
        if signals is not None and signals.received:
            raise KeyboardInterrupt
        for name, process in processes:
            code = process.poll()
            if code is not None:
                return name, code
        time.sleep(poll)


class StopSignals:
    """SIGTERM and SIGINT as a foreground command that supervises children sees them.

    At first a signal raises KeyboardInterrupt wherever the main thread is: start-up's bounded
    waits catch it and stop what they started. After ``defer()`` a signal is only recorded and the
    supervising loop acts on it between two polls: an exception raised at an arbitrary point could
    cut a print, a ``Popen.poll`` (leaving its lock taken) or the clean-up itself in half, and the
    children, in sessions of their own, would outlive the command.
    """

    def __init__(self) -> None:
        self.deferred = False
        self.received: list[int] = []

    def defer(self) -> None:
        self.deferred = True

    def exit_code(self) -> int:
        """The shell's code for the first signal received (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.received[0] if self.received else signal.SIGINT)

    def __call__(self, signum: int, frame: object) -> None:
        self.received.append(signum)
        if not self.deferred:
            raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals(deferred: bool = False) -> Iterator[StopSignals]:
    """Install ``StopSignals`` for SIGTERM and SIGINT while a foreground command waits for its
    children, restoring the previous handlers after. SIGINT is handled too: a command started in
    the background of a script inherits it ignored (and Python then installs no Ctrl-C handler), so
    `kill -INT` would otherwise leave the children running. Outside the main thread (which alone
    gets signals) nothing is installed and nothing is ever received."""
    signals = StopSignals()
    if deferred:
        signals.defer()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    previous = {sig: signal.signal(sig, signals) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield signals
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def free_port(avoid: Collection[int] = ()) -> int:
    """A TCP port free on 127.0.0.1 now, not one of ``avoid`` (ports picked for something else)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in avoid:
            return port


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _read_pid(pid_file: Path) -> int | None:
    """The pid ``pid_file`` names, unless another process has that pid now: the file also holds the
    process's start time (``/proc/PID/stat``), so after a crash or a reboot a reused pid is neither
    reported as running (refusing a start) nor signalled by a stop."""
    try:
        fields = pid_file.read_text().split()
        pid, started = int(fields[0]), int(fields[1]) if len(fields) > 1 else None
    except (FileNotFoundError, ValueError, IndexError):
        return None
    if started is not None and is_alive(pid):
        now = start_time(pid)
        if now is not None and now != started:
            return None
    return pid


def write_pid(pid_file: Path, pid: int) -> None:
    """``pid`` and its start time, as ``_read_pid`` checks them."""
    pid_file.write_text(f"{pid} {start_time(pid) or ''}".rstrip() + "\n")


def recorded_pid(pid_file: Path) -> int | None:
    """The process ``pid_file`` names, if it is still that process (alive or not); None otherwise."""
    return _read_pid(pid_file)


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (field 22 of ``/proc/PID/stat``); None without it."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def is_alive(pid: int) -> bool:
    """Whether ``pid`` runs. Our own exited child is reaped first (else it stays a zombie); any other
    zombie counts as exited: its parent, gone too, will not reap it soon (Ray's workers, for one)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # Linux: the state letter after the parenthesised command name, which may hold spaces
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc here (the signal found it), or it was just reaped


def _group_of(pid: int) -> int | None:
    """The process group of ``pid``; None once it is gone."""
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):  # not ours to signal: another user's process
            pass
