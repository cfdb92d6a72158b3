"""Submit a federated run (new or resumed), follow it round by round, and report its real outcome.

``flwr run`` returns 0 even when the run later fails, so the outcome here is the run's status
as the SuperLink reports it, together with the run folder's own status.json.
"""

from __future__ import annotations

import json
import time

from server.reports import round_line
from server.run_folder import RunFolder
from server.superlink import FlowerControl, FlowerError, UnknownRun

POLL_SECONDS = 2.0
# Asking the SuperLink spawns a `flwr ls` (about 1.6 s of CPU here): do it when the run folder says the
# ServerApp ended, and otherwise only this often, for a ServerApp that died without saying so.
SUPERLINK_CHECK_SECONDS = 30.0
FINISHED = "finished"
ENDED = {"finished", "failed"}  # the run folder's own terminal states


def submit_and_follow(control: FlowerControl, folder: RunFolder, follow: bool = True,
                      timeout: float | None = None) -> int:
    """Submit the app for ``folder``; with ``follow``, wait for the outcome (see follow_run)."""
    for old in folder.run_info().get("flower_runs", []):
        state = _state(control, old)
        if not state.startswith(FINISHED):
            # Left over from a crash (a killed SuperLink leaves its run 'running' in the database):
            # two ServerApps must never write one run folder.
            print(f"Flower run {old} of this folder is still '{state}' at the SuperLink; stopping it first",
                  flush=True)
            control.stop_run(old)
    run_id = control.submit(folder.path)
    folder.add_flower_run(run_id)
    print(f"run {run_id} submitted; results in {folder.path}", flush=True)
    if not follow:
        return 0
    return follow_run(control, folder, run_id, timeout)


def follow_run(control: FlowerControl, folder: RunFolder, run_id: int, timeout: float | None = None) -> int:
    """Print a line per completed round until the run ends; 0 when it completed, 1 otherwise.
    With ``timeout`` (seconds), give up waiting with FlowerError; the run itself goes on."""
    printed = {entry["round"] for entry in _rounds(folder)}
    # just submitted (or resumed): the first look at the SuperLink waits for a reason or the interval
    state, run, checked = "pending", {}, time.monotonic()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise FlowerError(f"run {run_id} did not finish within {timeout:g} s (last state '{state}')")
            for entry in _rounds(folder):
                if entry["round"] not in printed:
                    printed.add(entry["round"])
                    print(round_line(entry), flush=True)
            ended = folder.status().get("state") in ENDED  # (briefly stale when resuming: then asked every poll)
            if ended or time.monotonic() - checked > SUPERLINK_CHECK_SECONDS:
                run, checked = _run(control, run_id), time.monotonic()
                state = str(run.get("status", "unknown"))
                if state.startswith(FINISHED):
                    break
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        print(f"\nstopped following; run {run_id} goes on at the SuperLink. Watch it with `fedpath-server status`, "
              f"stop it with `flwr stop {run_id}`.")
        return 130
    for entry in _rounds(folder):  # rounds finished between the last poll and the end
        if entry["round"] not in printed:
            print(round_line(entry), flush=True)
    _save_log(control, folder, run_id)
    details = run.get("status-details", "")
    status = folder.status()
    if state == f"{FINISHED}:completed" and status.get("state") == "finished":
        print(f"run {run_id} completed {status.get('round')} of {status.get('total_rounds')} rounds; results in "
              f"{folder.path}\n  metrics.csv, curves.png, audit.jsonl, checkpoints/best.npz (round "
              f"{status.get('best_round')})")
        return 0
    reason = status.get("message") if status.get("state") == "failed" else details
    print(f"run {run_id} did not complete ({state}): {reason}\n  rounds done: {status.get('round', 0)}; "
          f"log: {folder.path / f'flower-run-{run_id}.log'}; continue with `fedpath-server resume {folder.path}`")
    return 1


def _state(control: FlowerControl, run_id: int) -> str:
    return str(_run(control, run_id).get("status", "unknown"))


def _run(control: FlowerControl, run_id: int) -> dict:
    """What the SuperLink says of the run (`flwr ls --run-id`)."""
    try:
        return control.run(run_id)
    except UnknownRun:  # a SuperLink without that database: the run is gone
        return {"status": f"{FINISHED}:unknown"}
    except FlowerError:
        return {"status": "unknown"}


def _rounds(folder: RunFolder) -> list[dict]:
    path = folder.path / "metrics.json"
    try:
        return json.loads(path.read_text()) if path.exists() else []
    except ValueError:  # being replaced right now: read it next time
        return []


def _save_log(control: FlowerControl, folder: RunFolder, run_id: int) -> None:
    try:
        (folder.path / f"flower-run-{run_id}.log").write_text(control.logs(run_id))
    except (FlowerError, OSError) as exc:
        print(f"(could not save the run's log: {exc})")

