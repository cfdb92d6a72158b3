"""`fedpath-site start`: this hospital's two federation processes, run and restarted as one unit.

- ``flower-supernode --isolation process`` connects out to the SuperLink (TLS with the
  consortium's CA unless ``--insecure``), keeps retrying while the server is down or
  restarting, and queues each message as a task on its Runtime API (loopback only,
  ``127.0.0.1:federation.port``). It starts no ClientApp and installs nothing.
- ``python -m client.task_runner`` (``client/task_runner.py``) takes those tasks and runs the
  locally installed ClientApp, for approved app bundles only, and writes the site's egress log.

A small supervisor starts both in its own process group (so ``fedpath-site stop`` stops all
three by the one PID in the pid file), restarts either when it exits, and writes a fresh random
secret (``state_dir/superexec.secret``, mode 0600) at every start, which both get: the SuperNode
then hands tasks only to a runner that holds it (Flower's SuperExec authentication).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from client.app import SITE_CONFIG_KEY
from client.egress_log import EGRESS_FILE
from client.site_config import SiteConfig
from shared.atomic_files import atomic_write_bytes
from shared.errors import UserError
from shared.processes import (
    executable,
    flower_env,
    running_pid,
    start,
    stop_pid,
    stop_signals,
    tail,
    write_pid,
)

log = logging.getLogger("fedpath.site")

NO_LIFETIME_LIMIT = ("WARNING: privacy.lifetime_epsilon is not set: each federation the consortium starts on this "
                     "site's data gets the full privacy.epsilon, with no limit over all of them. Set one in site.yaml "
                     "(see configs/site.example.yaml).")
NO_ROSTER = ("WARNING: federation.roster is not set: in SecAgg+ rounds this site takes the other sites' keys on "
             "the server's word, so a server that cheats could read its update (docs/security.md, section 2).")
INSECURE_WARNING = ("WARNING: --insecure: TLS is OFF. This site's model updates cross the network in clear text "
                    "and it cannot tell the real server from an impostor. Test machines only.")


class SiteStartError(UserError):
    pass


RUNTIME_HOST = "127.0.0.1"  # the SuperNode's Runtime API never listens beyond this machine
SECRET_FILE = "superexec.secret"


def runtime_address(config: SiteConfig) -> str:
    """host:port of the SuperNode's Runtime API, where the task runner takes its tasks."""
    return f"{RUNTIME_HOST}:{config.federation.port}"


def superexec_secret_path(config: SiteConfig) -> Path:
    return Path(config.state_dir) / SECRET_FILE


def write_superexec_secret(config: SiteConfig) -> Path:
    """A fresh random secret for this start (mode 0600 from creation): only processes started
    now, by this site's account, can take the SuperNode's tasks."""
    path = superexec_secret_path(config)
    atomic_write_bytes(path, secrets.token_hex(32).encode("ascii"), mode=0o600)
    return path


def read_superexec_secret(config: SiteConfig) -> bytes:
    path = superexec_secret_path(config)
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        raise SiteStartError(f"{path} is missing: the task runner is started by `fedpath-site start --config "
                             "site.yaml`, which writes it for the SuperNode and the runner") from None
    if not secret:
        raise SiteStartError(f"{path} is empty: start the site again with `fedpath-site start`")
    return secret


def _check_roster(config, site_yaml) -> None:
    """A roster that cannot be used stops the start here, not at the first round (refusal 9)."""
    if config.federation.roster is None:
        log.warning(NO_ROSTER)
        return
    from client.secure_round import SiteSigner, UnsafeRound

    try:
        SiteSigner.for_site(config.federation.roster, config.federation.auth_key)
    except (UnsafeRound, UserError) as exc:
        raise SiteStartError(f"{site_yaml}: federation.roster: {exc}") from None


def supernode_command(config: SiteConfig, site_yaml: Path, insecure: bool) -> list[str]:
    federation = config.federation
    if not federation.server:
        raise SiteStartError(f"{site_yaml}: federation.server is not set; put the host:port the consortium "
                             "admin gave you there")
    # --isolation process: the SuperNode runs no ClientApp and installs no bundle; the task runner
    # takes its tasks, authenticated by the secret both get (Flower checks it in this mode only).
    command = [executable("flower-supernode"), "--superlink", federation.server,
               "--isolation", "process", "--host", RUNTIME_HOST, "--port", str(federation.port),
               "--superexec-auth-secret-file", str(superexec_secret_path(config)),
               "--node-config", f"{SITE_CONFIG_KEY}='{Path(site_yaml).resolve()}'"]
    if config.privacy.lifetime_epsilon is None:
        log.warning(NO_LIFETIME_LIMIT)
    _check_roster(config, site_yaml)
    if insecure:
        print(INSECURE_WARNING, flush=True)
        log.warning(INSECURE_WARNING)
        return [*command, "--insecure"]
    if federation.ca_cert is None or not Path(federation.ca_cert).is_file():
        raise SiteStartError(f"{site_yaml}: federation.ca_cert "
                             f"{'is not set' if federation.ca_cert is None else f'({federation.ca_cert}) is missing'}"
                             ": TLS needs the consortium's ca.pem from the admin (or --insecure on a test machine)")
    key = Path(federation.auth_key)
    if not key.is_file():
        raise SiteStartError(f"{site_yaml}: this site's private key {key} is missing: make it with "
                             "`fedpath-site keygen --config site.yaml` and send the .pub file to the consortium "
                             "admin to register")
    return [*command, "--root-certificates", str(federation.ca_cert), "--auth-supernode-private-key", str(key)]


RETRY_MAX_S = 60.0
STABLE_S = 300.0  # a SuperNode that ran this long was connected: back off from the start again
# After a crash the SuperLink refuses the site's key until its old session expires, 60 s after its last heartbeat
# (Flower sends one about every 24 s). Within SESSION_HOLD_S of the first failure of a
# series a child is retried at most SESSION_RETRY_S apart, so a restarted site is back within seconds of that
# expiry instead of up to 30 s after it (the back-off was at 32 s by then); a key refused for good (revoked) is
# then asked at most every RETRY_MAX_S, each retry a new SuperNode process.
SESSION_HOLD_S = 75.0
SESSION_RETRY_S = 10.0
ACCEPTED_S = 30.0  # a SuperNode that ran this long was accepted (a refused one exits within seconds)
OWN_EXIT_S = 6.0  # how long a stopping child may take to exit by itself (Flower forces its own exit after 5 s)
RUNNER_READY_S = 180.0  # the runner imports Flower, the ClientApp, torch and Opacus first: seconds, more when busy


def wait_for_runner(config: SiteConfig, supervisor: subprocess.Popen, log_file: Path, log_offset: int,
                    records_before: int, timeout: float = RUNNER_READY_S) -> None:
    """Return once the task runner of a just-started site has written its ``start`` record to the
    egress log (it then serves tasks). If it exits first or takes too long, stop the whole unit and
    say why: a SuperNode without its runner would take messages it never answers."""
    egress_file = Path(config.state_dir) / EGRESS_FILE
    deadline = time.monotonic() + timeout
    while True:
        if any(record.get("event") == "start" for record in _records_after(egress_file, records_before)):
            return
        failed = "the task runner exited with code" in _read_from(log_file, log_offset)
        if failed or supervisor.poll() is not None or time.monotonic() > deadline:
            why = ("exited" if failed else "stopped" if supervisor.poll() is not None
                   else f"did not start within {timeout:g} s")
            stop_pid(supervisor.pid)
            Path(config.state_dir, "supernode.pid").unlink(missing_ok=True)
            raise SiteStartError(f"the task runner of {config.name} {why}, so the site was stopped again; "
                                 f"last lines of {log_file}:\n{tail(log_file, 25)}")
        time.sleep(0.5)


def _line_count(path: Path) -> int:
    try:
        return len(path.read_bytes().splitlines())
    except FileNotFoundError:
        return 0


def _records_after(path: Path, count: int) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()[count:]
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:  # a line being written right now
            continue
    return records


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def runner_command(site_yaml: Path) -> list[str]:
    return [sys.executable, "-m", "client.task_runner", str(Path(site_yaml).resolve())]


def start_supernode(config: SiteConfig, site_yaml: Path, insecure: bool, detach: bool) -> int:
    """Run the SuperNode and the task runner under a small supervisor that restarts either when it
    exits: the SuperNode when the SuperLink refuses or drops it (right after a crash the SuperLink
    still holds the old session for about a minute and refuses the same key; a restart a little
    later is accepted), the runner when it fails.

    Args:
        config: the site's configuration.
        site_yaml: its file (passed on to the SuperNode's node config and to the runner).
        insecure: no TLS towards the SuperLink (test machines only).
        detach: start the supervisor in the background (pid file ``state_dir/supernode.pid``).
    """
    state = Path(config.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    command = supernode_command(config, site_yaml, insecure)  # config errors surface here, in the foreground
    pid_file, log_file = state / "supernode.pid", state / "supernode.log"
    if detach:
        supervisor = [sys.executable, "-m", "client.supernode", str(Path(site_yaml).resolve()),
                      *(["--insecure"] if insecure else [])]
        log_offset = log_file.stat().st_size if log_file.exists() else 0
        records_before = _line_count(state / EGRESS_FILE)
        process = start(supervisor, log_file, pid_file, flower_env(state / "flwr"), f"the SuperNode of {config.name}",
                        ready_port=(RUNTIME_HOST, config.federation.port))
        wait_for_runner(config, process, log_file, log_offset, records_before)
        print(f"{config.name}: SuperNode and task runner started (pid {process.pid}), connecting to "
              f"{config.federation.server}; log {log_file}, egress log {state / EGRESS_FILE}", flush=True)
        return 0
    pid = running_pid(pid_file)
    if pid is not None and pid != os.getpid():
        raise SiteStartError(f"the SuperNode of {config.name} is already running (pid {pid}, {pid_file})")
    write_pid(pid_file, os.getpid())
    try:
        write_superexec_secret(config)
        children = [
            Child("the SuperNode", command,
                  "the SuperLink refused or dropped it (a key that is not registered or was revoked, a ca_cert that is "
                  "not the consortium's, or a session still open from before a crash)", ends_all_on_success=True),
            Child("the task runner", runner_command(site_yaml),
                  "the lines above say why (the site's messages wait in the SuperNode meanwhile)"),
        ]
        return supervise(children, flower_env(state / "flwr"), log_file, config.name)
    finally:
        pid_file.unlink(missing_ok=True)


@dataclass
class Child:
    """One supervised process and its restart schedule."""

    name: str
    command: list[str]
    exit_reason: str  # said after "exited with code N:"
    ends_all_on_success: bool = False  # its clean exit stops the whole unit
    process: subprocess.Popen | None = None
    started: float = 0.0
    delay: float = 2.0
    restart_at: float = field(default=0.0)
    failing_since: float | None = None  # the first exit of the current series of failures

    def schedule_restart(self, now: float) -> float:
        """The child exited at ``now``: set when it starts again; the delay. Backs off from 2 s, doubling up
        to ``SESSION_RETRY_S`` within ``SESSION_HOLD_S`` of the series' first failure and up to ``RETRY_MAX_S``
        after. A child that had run ``STABLE_S`` starts a new series from 2 s; one that had run ``ACCEPTED_S``
        was connected, so its old session may be held again: a new series, at most ``SESSION_RETRY_S`` apart
        (not from 2 s: a child that keeps failing after a minute is not restarted every few seconds)."""
        ran = now - self.started
        if self.failing_since is None or ran > STABLE_S:
            self.delay, self.failing_since = 2.0, now
        elif ran > ACCEPTED_S:
            self.delay, self.failing_since = min(self.delay, SESSION_RETRY_S), now
        delay = self.delay
        self.restart_at = now + delay
        longest = SESSION_RETRY_S if self.restart_at - self.failing_since < SESSION_HOLD_S else RETRY_MAX_S
        self.delay = min(2 * delay, longest)
        return delay

    def start(self, env: dict[str, str], log_file: Path) -> None:
        with open(log_file, "ab") as log_handle:  # no new session: the children stay in the supervisor's group
            self.process = subprocess.Popen(self.command, stdout=log_handle, stderr=subprocess.STDOUT, env=env)
        self.started = time.monotonic()

    def stop(self, own_exit: float = 0.0, timeout: float = 15.0) -> None:
        """Stop the child: give it ``own_exit`` seconds to exit by itself first (it got the same signal as the
        supervisor), then SIGTERM, then SIGKILL after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return
        try:  # a second SIGTERM would cut its own exit short (Flower's SuperNode signs off at the SuperLink)
            self.process.wait(timeout=own_exit)
            return
        except subprocess.TimeoutExpired:
            pass  # the signal reached only the supervisor (or the child is stuck)
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)


def supervise(children: list[Child], env: dict[str, str], log_file: Path, name: str) -> int:
    """Keep ``children`` running: start each, restart it after it exits (``Child.schedule_restart``:
    from 2 s, every 10 s at most while a crashed site's old session may still be held, then up to
    ``RETRY_MAX_S``), stop them all on Ctrl-C or
    SIGTERM (exit code 130 or 143). Returns when a child with ``ends_all_on_success`` exits with
    code 0. A signal is acted on between two polls, so no poll or stop is cut in half."""
    with stop_signals(deferred=True) as signals:
        try:
            while not signals.received:
                now = time.monotonic()
                for child in children:
                    if child.process is None:
                        if now >= child.restart_at:
                            child.start(env, log_file)
                        continue
                    code = child.process.poll()
                    if code is None:
                        continue
                    child.process = None
                    if code == 0 and child.ends_all_on_success:
                        return 0
                    delay = child.schedule_restart(now)
                    print(f"{time.strftime('%H:%M:%S')} {name}: {child.name} exited with code {code}: "
                          f"{child.exit_reason}. Retrying in {delay:.0f} s; see {log_file}", flush=True)
                time.sleep(0.5)
            return signals.exit_code()
        finally:  # a stop signals the unit's process group: on a signal the children got it too
            for child in children:
                child.stop(own_exit=OWN_EXIT_S if signals.received else 0.0)


def main(argv: list[str] | None = None) -> int:
    """``python -m client.supernode SITE_YAML [--insecure]``: the detached supervisor."""
    from client.site_config import load_site_config

    args = sys.argv[1:] if argv is None else argv
    site_yaml = Path(args[0])
    return start_supernode(load_site_config(site_yaml), site_yaml, insecure="--insecure" in args, detach=False)


if __name__ == "__main__":
    sys.exit(main())
