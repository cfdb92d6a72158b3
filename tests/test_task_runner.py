"""The task runner's decisions without processes: which bundle runs, what an exception or a policy
failure sends (a code, no text), what the egress log gets; and the supervisor that keeps the
SuperNode and the runner running."""

from __future__ import annotations

import io
import logging
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile
from itertools import pairwise

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.proto.runtime_pb2 import AcquireTaskResponse  # pylint: disable=E0611
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError, pull_objects

from client import task_runner
from client.egress_log import ERROR, REFUSED, SENT, WITHHELD, EgressLog
from client.egress_policy import EgressPolicy, plan_federation
from client.site_config import load_site_config
from client.site_status import status_report
from client.supernode import (
    Child,
    SiteStartError,
    read_superexec_secret,
    supervise,
    wait_for_runner,
    write_superexec_secret,
)
from client.task_runner import BundleApproval, TaskRunner, TaskSuperseded, until_superseded
from shared.app_bundle import bundle_digest, installed_bundle
from tests.conftest import write_site_yaml
from tests.flower_messages import evaluate_reply, fit_reply, server_message, site_context


class ToyClientApp:
    """Stands for client.app:app; counts its calls (the bundle check must come first)."""

    def __init__(self, reply=None, fail: BaseException | None = None) -> None:
        self.calls, self.fail = 0, fail
        self.app = ClientApp()

        @self.app.evaluate()
        def evaluate(message: Message, context) -> Message:
            self.calls += 1
            if self.fail is not None:
                raise self.fail
            return (reply or (lambda m: evaluate_reply(m, {"epsilon": 1.0})))(message)

    def __call__(self, message: Message, context) -> Message:
        return self.app(message=message, context=context)


@pytest.fixture(scope="module")
def installed_fab() -> Fab:
    content = installed_bundle()
    return Fab("h1", content, {})


def _changed_fab(fab: Fab) -> Fab:
    """The installed bundle with one client file changed (an admin's modified ClientApp)."""
    source = zipfile.ZipFile(io.BytesIO(fab.content))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for info in source.infolist():
            data = source.read(info)
            archive.writestr(info, data + b"\n# changed\n" if info.filename == "client/app.py" else data)
    return Fab("h2", buffer.getvalue(), {})


def _runner(tmp_path, app, installed_fab, allowed=()) -> TaskRunner:
    approval = BundleApproval(bundle_digest(installed_fab.content), allowed)
    policy = EgressPolicy(frozenset({"epsilon", "refused"}), True)
    return TaskRunner(app, approval, policy, EgressLog(tmp_path), "127.0.0.1:1", None)


def _evaluate() -> Message:
    return server_message(message_type="evaluate")


def test_the_installed_bundle_runs_the_local_clientapp(tmp_path, installed_fab):
    app = ToyClientApp()
    answer = _runner(tmp_path, app, installed_fab).answer(_evaluate(), site_context(), installed_fab)
    assert answer.outcome == SENT and not answer.reply.has_error() and app.calls == 1
    assert answer.bundle == bundle_digest(installed_fab.content)


def test_another_bundle_is_refused_and_nothing_runs(tmp_path, installed_fab, caplog):
    app = ToyClientApp()
    changed = _changed_fab(installed_fab)
    answer = _runner(tmp_path, app, installed_fab).answer(_evaluate(), site_context(), changed)
    assert answer.outcome == REFUSED and app.calls == 0
    assert answer.reply.error.code == 1012 and not answer.reply.error.reason
    assert f"bundle sha256:{bundle_digest(changed.content)}" in caplog.text
    # the run's own name for its bundle proves nothing: the bytes are what is checked
    runner = _runner(tmp_path, app, installed_fab)
    assert runner.answer(_evaluate(), site_context(), installed_fab).outcome == SENT
    disguised = Fab(installed_fab.hash_str, changed.content, {})
    assert runner.answer(_evaluate(), site_context(), disguised).outcome == REFUSED and app.calls == 1
    app.calls = 0
    # unreadable bundles too
    answer = _runner(tmp_path, app, installed_fab).answer(_evaluate(), site_context(), Fab("h3", b"junk", {}))
    assert answer.outcome == REFUSED and app.calls == 0 and answer.bundle is None


def test_a_bundle_the_site_listed_runs(tmp_path, installed_fab):
    app = ToyClientApp()
    changed = _changed_fab(installed_fab)
    runner = _runner(tmp_path, app, installed_fab, allowed=[f"sha256:{bundle_digest(changed.content)}"])
    assert runner.answer(_evaluate(), site_context(), changed).outcome == SENT and app.calls == 1


def test_an_exception_leaves_as_a_code_only_and_the_runner_goes_on(tmp_path, installed_fab, caplog):
    app = ToyClientApp(fail=KeyError("patient P-0017 has no slides in /data/hospital-a"))
    runner = _runner(tmp_path, app, installed_fab)
    with caplog.at_level(logging.INFO, logger="fedpath.runner"):
        answer = runner.answer(_evaluate(), site_context(), installed_fab)
    assert answer.outcome == ERROR and answer.reply.error.code == 1013 and not answer.reply.error.reason
    assert "P-0017" in caplog.text  # the details stay in the site's log
    app.fail = SystemExit(3)  # not even sys.exit in a library ends the runner
    assert runner.answer(_evaluate(), site_context(), installed_fab).reply.error.code == 1013
    app.fail = None
    assert runner.answer(_evaluate(), site_context(), installed_fab).outcome == SENT


def test_the_runner_log_writes_exceptions_escaped_so_none_forges_a_line():
    # In a fresh interpreter: the runner's own logging set-up, as `python -m client.task_runner` makes it. A
    # ValueError's message is its text as given (a KeyError's would be a repr, escaped already).
    script = ("import logging; from client.task_runner import configure_site_log; configure_site_log()\n"
              "try:\n    raise ValueError('stage\\n12:00:00 INFO fedpath.runner: task 9: sent')\n"
              "except ValueError:\n    logging.getLogger('fedpath.runner').exception('task 8: failed')\n")
    lines = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           timeout=60).stderr.splitlines()
    assert lines[0].endswith("ERROR fedpath.runner: task 8: failed") and len(lines[0]) < 60
    assert lines[1] == "ValueError: stage\\n12:00:00 INFO fedpath.runner: task 9: sent"
    assert not any(line.startswith("12:00:00") for line in lines)  # the forged line stays inside the message
    assert lines[2].startswith('  File "<string>"')


def test_a_reply_that_fails_the_policy_is_withheld(tmp_path, installed_fab, caplog):
    app = ToyClientApp(reply=lambda m: evaluate_reply(m, {"epsilon": 1.0, "slide": "S-17"}))
    answer = _runner(tmp_path, app, installed_fab).answer(_evaluate(), site_context(), installed_fab)
    assert answer.outcome == WITHHELD and answer.reply.error.code == 1014 and not answer.reply.error.reason
    assert answer.violation.field == "configs:evaluateres.metrics/slide"
    assert "rule (a) at configs:evaluateres.metrics/slide" in caplog.text and "S-17" not in caplog.text


def test_a_reply_whose_plaintext_weight_is_not_the_plans_s_is_withheld(tmp_path, installed_fab):
    """The runner reads the plan's S from the message before the ClientApp runs and holds the reply to it."""
    from shared.round_plan import RoundPlan

    plan = RoundPlan(federation_id="fed-1", classes=("a", "b"), weight_scale=50).to_config()
    message = server_message(RecordDict({"fitins.config": ConfigRecord(plan)}), message_type="evaluate")
    for examples, outcome in ((12, WITHHELD), (50, SENT)):  # a patient count there, then the plan's S
        app = ToyClientApp(reply=lambda m, n=examples: fit_reply(m, {"epsilon": 1.0}, examples=n))
        answer = _runner(tmp_path / str(examples), app, installed_fab).answer(message, site_context(), installed_fab)
        assert answer.outcome == outcome, examples
    assert answer.reply.content.metric_records["fitres.num_examples"]["num_examples"] == 50


class TrainingClientApp(ToyClientApp):
    """Records a training round in the federation's real privacy ledger, as the ClientApp does before its
    update leaves, then replies with the plan's S. ``opening`` runs before it opens the ledger, ``during``
    after it recorded (a ledger replaced at either moment)."""

    def __init__(self, state_dir, opening=None, during=None, kind: str = "training") -> None:
        from client.privacy_ledger import PrivacyBudget, PrivacyLedger, federation_ledger

        def train(message: Message) -> Message:
            if opening is not None:
                opening()
            ledger = PrivacyLedger(federation_ledger(state_dir, plan_federation(message)), PrivacyBudget(8.0, 1e-5))
            round_id = ledger.unused_round_id(f"round-{message.metadata.group_id}")
            ledger.record_segment((5.0, 0.01, 1), round_id=round_id + ("-evaluation" if kind == "evaluation" else ""),
                                  kind=kind)
            if during is not None:
                during()
            return fit_reply(message, {"epsilon": 1.0}, examples=50)

        super().__init__(reply=train)


def _training(round_: int, federation: str = "fed-1") -> Message:
    from shared.round_plan import RoundPlan

    plan = RoundPlan(federation_id=federation, classes=("a", "b"), weight_scale=50, round=round_).to_config()
    return server_message(RecordDict({"fitins.config": ConfigRecord(plan)}), message_type="evaluate", round_=round_)


def _started_runner(state, app, installed_fab) -> TaskRunner:
    """A runner as build_runner starts it: its guard read from the egress log, then its start record written
    (the first one of a log holds the ledgers' baseline)."""
    from client.ledger_guard import LedgerGuard

    runner = _runner(state, app, installed_fab)
    runner.guard = LedgerGuard(state, runner.egress.chain.records())
    runner.egress.append({"event": "start", **runner.guard.start_fields()})
    return runner


def _serve(runner: TaskRunner, round_: int, fab: Fab, federation: str = "fed-1"):
    message = _training(round_, federation)
    return runner.record(message, runner.answer(message, site_context(), fab))


def _marks(runner: TaskRunner) -> list:
    return [r.get("spent") for r in runner.egress.verify() if r["event"] == "reply"]


def test_a_deleted_or_rolled_back_ledger_refuses_the_federation_until_restored(tmp_path, installed_fab, caplog):
    """The attack on the site's own files: its ledger deleted, or restored from an older backup, would plan
    the federation again from ε = 0. The egress log counts the trainings; the runner refuses."""
    from client.privacy_ledger import federation_ledger

    state = tmp_path / "state"
    ledger = federation_ledger(state, "fed-1")
    app = TrainingClientApp(state)
    runner = _started_runner(state, app, installed_fab)
    backups = []
    for round_ in (1, 2):
        answer = _serve(runner, round_, installed_fab)
        assert answer.outcome == SENT and answer.spent == "fed-1"
        backups.append(ledger.read_bytes())
    assert _marks(runner) == ["fed-1", "fed-1"]

    ledger.unlink()  # deleted: the site restarts (a new runner reads the egress log) and round 3 comes
    site = load_site_config(write_site_yaml(tmp_path, {"manifest": "m.csv"}, state_dir=str(state)))
    assert "fed-1\n  LEDGER BEHIND: " in status_report(site)  # what `fedpath-site status` shows the DPO
    assert "records 0 release(s), the egress log shows 2" in status_report(site)
    for broken in ("deleted", backups[0]):  # then an older copy restored (one training of two)
        if broken != "deleted":
            ledger.write_bytes(broken)
        runner = _started_runner(state, app, installed_fab)
        calls = app.calls
        answer = _serve(runner, 3, installed_fab)
        assert answer.outcome == REFUSED and answer.reply.error.code == 1018 and not answer.reply.error.reason
        assert app.calls == calls  # nothing ran
        assert ledger.exists() == (broken != "deleted")  # and nothing was planned afresh
        assert "egress log shows 2 in federation fed-1" in caplog.text
    ledger.write_bytes(backups[1])  # the latest copy restored: the federation goes on
    answer = _serve(runner, 3, installed_fab)
    assert answer.outcome == SENT and answer.spent == "fed-1"
    assert runner.guard.before("fed-2") == []  # another federation is not held back by this one's


def _served_twice(state, fab: Fab):
    """A started runner that served rounds 1 and 2 of fed-1; its ledger, and the ledger's copy after round 1."""
    from client.privacy_ledger import federation_ledger

    ledger = federation_ledger(state, "fed-1")
    runner = _started_runner(state, TrainingClientApp(state), fab)
    _serve(runner, 1, fab)
    copy = ledger.read_bytes()
    _serve(runner, 2, fab)
    return runner, ledger, copy


@pytest.mark.parametrize("moment", ["opening", "during"])
def test_a_ledger_replaced_while_the_round_ran_withholds_the_reply(tmp_path, installed_fab, moment):
    """An older copy swapped in after the check: before the ClientApp opens the ledger (it then records its
    training into the copy: as many trainings as before, but not the same ones) or after it recorded."""
    runner, ledger, copy = _served_twice(tmp_path / "state", installed_fab)
    runner.app = TrainingClientApp(tmp_path / "state", **{moment: lambda: ledger.write_bytes(copy)})
    answer = _serve(runner, 3, installed_fab)
    assert answer.outcome == WITHHELD and answer.reply.error.code == 1018
    assert answer.violation.rule == "ledger" and answer.spent is None
    assert _marks(runner) == ["fed-1", "fed-1", None]


def test_the_first_start_of_a_log_takes_the_ledgers_as_they_are(tmp_path, installed_fab):
    """A site upgraded from a version without the guard, or whose egress log was moved away (the documented
    way out of a broken log), still holds its ledgers: the new log's first start record copies their counts."""
    from client.ledger_guard import BASELINE_KEY
    from client.privacy_ledger import federation_ledger

    state = tmp_path / "state"
    ledger = federation_ledger(state, "fed-1")
    runner = _started_runner(state, TrainingClientApp(state), installed_fab)
    _serve(runner, 1, installed_fab)
    _serve(runner, 2, installed_fab)
    for path in (runner.egress.path, runner.egress.head_path):  # the DPO moves a broken log away
        path.rename(tmp_path / path.name)
    runner = _started_runner(state, TrainingClientApp(state), installed_fab)
    [start] = runner.egress.verify()
    assert start[BASELINE_KEY] == {"fed-1": 2}
    ledger.unlink()
    restarted = _started_runner(state, TrainingClientApp(state), installed_fab)
    assert BASELINE_KEY not in restarted.egress.verify()[-1]  # the first start's baseline stands
    assert _serve(restarted, 3, installed_fab).reply.error.code == 1018


def test_a_rollback_while_the_runner_runs_and_an_unreadable_ledger_are_refused(tmp_path, installed_fab):
    """No restart needed: the runner counts what it marks as it goes; a ledger it cannot read once the site
    spent in its federation is refused too (not left to the ClientApp, which would plan afresh if it could)."""
    runner, ledger, older = _served_twice(tmp_path / "state", installed_fab)
    latest = ledger.read_bytes()
    ledger.write_bytes(older)
    assert _serve(runner, 3, installed_fab).reply.error.code == 1018
    ledger.write_bytes(latest[:-40])  # cut short: unreadable
    assert _serve(runner, 3, installed_fab).reply.error.code == 1018
    ledger.write_bytes(latest)
    assert _serve(runner, 3, installed_fab).spent == "fed-1"


def test_a_deleted_ledger_of_one_federation_holds_every_federation_back(tmp_path, installed_fab, caplog):
    """The lifetime limit adds up every ledger: one deleted would leave room another federation could spend."""
    from client.privacy_ledger import federation_ledger

    state = tmp_path / "state"
    runner = _started_runner(state, TrainingClientApp(state), installed_fab)
    _serve(runner, 1, installed_fab)
    federation_ledger(state, "fed-1").unlink()
    calls = runner.app.calls
    answer = _serve(runner, 1, installed_fab, federation="fed-2")
    assert answer.reply.error.code == 1018 and runner.app.calls == calls
    assert "ledgers/fed-1.json records 0 release(s)" in caplog.text
    # and a federation id differing only in case (one file on a case-insensitive file system) is the same one
    assert runner.guard.owed("FED-1") == 1


def test_an_evaluation_release_rolled_back_is_caught_like_a_training(tmp_path, installed_fab):
    """The last exchange only scores the final model: its release is recorded as an evaluation, and is owed too."""
    from client.privacy_ledger import federation_ledger

    state = tmp_path / "state"
    ledger = federation_ledger(state, "fed-1")
    runner = _started_runner(state, TrainingClientApp(state, kind="evaluation"), installed_fab)
    _serve(runner, 1, installed_fab)
    older = ledger.read_bytes()
    assert _serve(runner, 2, installed_fab).spent == "fed-1"
    ledger.write_bytes(older)
    assert _serve(runner, 2, installed_fab).reply.error.code == 1018


def test_a_state_dir_changed_while_the_site_runs_is_refused(tmp_path, installed_fab, caplog):
    """The ClientApp reads site.yaml for every message: a new state_dir would give it an empty ledger folder."""
    state = tmp_path / "state"
    site = write_site_yaml(tmp_path, {"manifest": "m.csv"}, state_dir=str(state))
    runner = _started_runner(state, TrainingClientApp(state), installed_fab)
    runner.site_yaml = site
    assert _serve(runner, 1, installed_fab).spent == "fed-1"
    write_site_yaml(tmp_path, {"manifest": "m.csv"}, state_dir=str(tmp_path / "fresh"))
    assert _serve(runner, 2, installed_fab).reply.error.code == 1018
    assert "now names state_dir" in caplog.text and "restart the site" in caplog.text


def test_a_reply_that_trained_nothing_is_not_counted(tmp_path, installed_fab):
    state = tmp_path / "state"
    runner = _started_runner(state, ToyClientApp(reply=lambda m: fit_reply(m, {"epsilon": 1.0}, examples=50)),
                             installed_fab)
    answer = _serve(runner, 1, installed_fab)
    assert answer.outcome == SENT and answer.spent is None  # its ledger recorded no training: a refusal, say
    assert runner.guard.sent["fed-1"] == 0 and _marks(runner) == [None]

def test_a_reply_to_another_message_is_an_error(tmp_path, installed_fab):
    other = server_message(RecordDict({"x": ConfigRecord({"a": 1})}), message_type="evaluate", round_=9)
    other.metadata.__dict__["_message_id"] = "not-the-one"  # as the SuperNode numbers messages
    app = ToyClientApp(reply=lambda m: evaluate_reply(other, {"epsilon": 1.0}))
    answer = _runner(tmp_path, app, installed_fab).answer(_evaluate(), site_context(), installed_fab)
    assert answer.outcome == ERROR and answer.reply.error.code == 1013


def test_every_answer_is_recorded_before_it_leaves(tmp_path, installed_fab):
    runner = _runner(tmp_path, ToyClientApp(), installed_fab)
    message = _evaluate()
    answer = runner.record(message, runner.answer(message, site_context(), installed_fab))
    refused = runner.record(message, runner.answer(message, site_context(), _changed_fab(installed_fab)))
    records = runner.egress.verify()
    assert [r["outcome"] for r in records] == [SENT, REFUSED]
    assert records[1]["error_code"] == 1012 and records[1]["bundle"] == refused.bundle
    assert answer.reply is not None
    runner.egress.path.write_text("broken\n")  # a log that cannot be appended to: only a bare code leaves
    blocked = runner.record(message, runner.answer(message, site_context(), installed_fab))
    assert blocked.reply.error.code == 1013 and not blocked.reply.error.reason


def test_fit_reply_under_secure_aggregation_requirement(tmp_path, installed_fab):
    """The plain update never leaves a site that requires SecAgg+, whatever the ClientApp does."""
    def plain_update(message: Message, context) -> Message:
        return fit_reply(message, {"epsilon": 1.0}, arrays=True)

    answer = _runner(tmp_path, plain_update, installed_fab).answer(server_message(), site_context(), installed_fab)
    assert answer.outcome == WITHHELD and answer.violation.rule == "c"


class MissingObject:
    """A SuperNode's object store in which object "b" never arrives (a task Flower left behind)."""

    def __init__(self) -> None:
        self.asks = {"a": 0, "b": 0}

    def __call__(self, object_id: str) -> bytes:
        self.asks[object_id] += 1
        if object_id == "b":
            raise ObjectUnavailableError(object_id)
        return b"content"


def test_a_task_whose_objects_never_come_is_given_up_once_the_supernode_moved_on():
    store, answers = MissingObject(), iter([False, False, True])
    pull = until_superseded(store, lambda: next(answers))
    # Flower's own retry loop, with a two-hour limit: only the later task ends it
    with pytest.raises(ObjectPullError) as raised:
        pull_objects(["a", "b"], pull, max_time=7200, initial_backoff=0.01, backoff_cap=0.02)
    assert isinstance(raised.value.__cause__, TaskSuperseded)
    assert store.asks == {"a": 1, "b": 3}
    # while nothing says so, a missing object is only "not yet" (Flower retries, up to its limit)
    store = MissingObject()
    with pytest.raises(ObjectPullError, match="retry limit") as raised:
        pull_objects(["b"], until_superseded(store, lambda: False), max_tries_per_object=4, initial_backoff=0.01)
    assert raised.value.__cause__ is None and store.asks["b"] == 4


class Acquirer:
    """The SuperNode's AcquireTask, answering from a list (an empty answer: no task)."""

    def __init__(self, answers: list[AcquireTaskResponse]) -> None:
        self.answers, self.asks = answers, 0

    def AcquireTask(self, request) -> AcquireTaskResponse:  # noqa: N802 - Flower's method name
        self.asks += 1
        return self.answers.pop(0) if self.answers else AcquireTaskResponse()


def test_the_later_task_is_kept_to_be_served_next(tmp_path, installed_fab, monkeypatch):
    runner = _runner(tmp_path, ToyClientApp(), installed_fab)
    later = AcquireTaskResponse(task=Task(task_id=42), token="t42")
    acquirer = Acquirer([AcquireTaskResponse(), later])
    check = runner._later_task_check(acquirer)
    assert check() is False and check() is False  # within SUPERSEDED_CHECK_S of the task's start: not asked
    assert acquirer.asks == 0
    monkeypatch.setattr(task_runner, "SUPERSEDED_CHECK_S", 0.0)
    assert check() is False and acquirer.asks == 1  # asked: no later task
    assert check() is True and runner._later == ("t42", 42)
    assert check() is True and acquirer.asks == 2  # the task is taken once, and kept for serve_forever


def test_superexec_secret_is_fresh_and_private(tmp_path):
    (tmp_path / "manifest.csv").write_text("slide,label\n")
    (tmp_path / "site.yaml").write_text("name: h\ndata: {manifest: manifest.csv}\n")
    config = load_site_config(tmp_path / "site.yaml")
    path = write_superexec_secret(config)
    first = read_superexec_secret(config)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(first) == 64
    write_superexec_secret(config)
    assert read_superexec_secret(config) != first


@pytest.mark.timeout(120)  # supervise() runs in this process: a supervisor that never stopped fails here
def test_supervisor_restarts_a_child_that_exits_and_stops_with_the_supernode(tmp_path, capsys):
    counter, log_file = tmp_path / "starts", tmp_path / "site.log"
    flaky = [sys.executable, "-c", f"open({str(counter)!r}, 'a').write('x'); raise SystemExit(3)"]
    supernode = [sys.executable, "-c", "import time; time.sleep(3.5)"]  # exits 0: the unit ends
    code = supervise([Child("the SuperNode", supernode, "refused", ends_all_on_success=True),
                      Child("the task runner", flaky, "the lines above say why")], {}, log_file, "hospital-a")
    assert code == 0  # the SuperNode's exit ended the unit (a supervisor that did not stop: the suite's timeout)
    assert counter.read_text() == "xx"  # started, exited, restarted 2 s later; the next try would be 4 s after that
    assert "hospital-a: the task runner exited with code 3: the lines above say why. Retrying in 2 s" in \
        capsys.readouterr().out


def test_a_refused_site_is_retried_every_10_s_while_its_old_session_may_be_held_then_less_often():
    """After a crash the SuperLink refuses the site's key for up to 60 s (until its last heartbeat expires):
    the supervisor asks every 10 s at most in that time, so the site is back within seconds of the expiry;
    a key refused for good is then asked ever less often, up to once a minute."""
    def refusals(child: Child, now: float, runs: list[float]) -> tuple[list[float], list[float]]:
        delays, retries = [], []
        for ran in runs:
            child.started, now = now, now + ran  # e.g. a refused SuperNode runs about 3 s
            delays.append(child.schedule_restart(now))
            assert child.restart_at == now + delays[-1]
            now = child.restart_at
            retries.append(now)
        return delays, retries

    def back_within_13_s_of_the_expiry(child: Child, retries: list[float]) -> bool:
        """Every retry up to the first one after the SuperLink let go (60 s after the failure at the latest)
        came at most 13 s (10 s and a SuperNode's start) after the one before."""
        first_after = next(t for t in retries if t >= child.failing_since + 60)
        return all(b - a <= 13 for a, b in pairwise(retries) if b <= first_after)

    child = Child("the SuperNode", [], "refused")
    delays, retries = refusals(child, 0.0, [3.0] * 12)
    assert delays == [2, 4, 8, 10, 10, 10, 10, 10, 20, 40, 60, 60]
    assert back_within_13_s_of_the_expiry(child, retries)
    # accepted, connected 100 s, crashed: its old session is held again, so 10-s steps again, not 60 s
    delays, retries = refusals(child, retries[-1], [100.0] + [3.0] * 9)
    assert delays == [10, 10, 10, 10, 10, 10, 20, 40, 60, 60]
    assert back_within_13_s_of_the_expiry(child, retries)
    # a SuperNode that ran 5 minutes was stable: a new series from 2 s
    assert refusals(child, retries[-1], [301.0] + [3.0] * 5)[0] == [2, 4, 8, 10, 10, 10]


@pytest.mark.slow(seconds=8)  # each waits 6 s for the children's own exit: handed out early, beside busy tests
@pytest.mark.parametrize("signals, expected", [(["SIGTERM"], 143), (["SIGINT"], 130),
                                                (["SIGTERM", "SIGTERM", "SIGINT"], 143)])
def test_the_supervisor_stops_its_children_on_a_signal_even_when_more_follow(tmp_path, signals, expected):
    """`fedpath-site stop` (SIGTERM), Ctrl-C, or a service manager that repeats its signal: the
    children are stopped whole and the code says which signal came first."""
    from shared.processes import is_alive

    pid_file = tmp_path / "child.pid"
    child = ("import os, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (time.sleep(1), sys.exit(0))); "
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")  # slow to stop, like a SuperNode
    code = ("import sys; from pathlib import Path; from client.supernode import Child, supervise; "
            f"sys.exit(supervise([Child('the SuperNode', [sys.executable, '-c', {child!r}], 'x', "
            f"ends_all_on_success=True)], {{}}, Path({str(tmp_path / 'site.log')!r}), 'hospital-a'))")
    process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and process.poll() is None, "the child never started"
            time.sleep(0.1)
        child_pid = int(pid_file.read_text())
        for name in signals:
            process.send_signal(getattr(signal, name))
            time.sleep(0.3)  # the later ones arrive while the child is being stopped
        assert process.wait(timeout=60) == expected
        assert not is_alive(child_pid)
    finally:
        _kill_group(process)


GRACEFUL_CHILD = """
import pathlib, signal, sys, time
def graceful(signum, frame):  # as Flower's processes do: the handler is reset, a second SIGTERM kills
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(1.0)  # a SuperNode signing off at the SuperLink
    pathlib.Path(sys.argv[1]).write_text("signed off")
    sys.exit(0)
signal.signal(signal.SIGTERM, graceful)
pathlib.Path(sys.argv[2]).write_text("ready")
time.sleep(120)
"""


def test_fedpath_site_stop_lets_a_child_finish_its_graceful_exit(tmp_path):
    """`fedpath-site stop` (``stop_pid`` on the supervisor's group) gives each process one SIGTERM: a second
    one, from the stop's own signal to every descendant or from the supervisor's, killed Flower's SuperNode
    during its graceful exit, before it signed off at the SuperLink (2 stops of 3 in a trial)."""
    from shared.processes import stop_pid

    done, ready = tmp_path / "done", tmp_path / "ready"
    child = [sys.executable, "-c", GRACEFUL_CHILD, str(done), str(ready)]
    code = ("import sys; from pathlib import Path; from client.supernode import Child, supervise; "
            f"sys.exit(supervise([Child('the SuperNode', {child!r}, 'x')], {{}}, "
            f"Path({str(tmp_path / 'site.log')!r}), 'hospital-a'))")
    supervisor = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline and supervisor.poll() is None, "the child never started"
            time.sleep(0.05)
        assert stop_pid(supervisor.pid)  # (it reaps the supervisor: its exit code is not ours to read)
        assert done.read_text() == "signed off"
    finally:
        _kill_group(supervisor)


def test_a_reply_that_cannot_be_described_leaves_as_a_recorded_code(tmp_path, installed_fab):
    """The egress log records what leaves; what it cannot describe does not leave."""
    from flwr.app import Array, ArrayRecord

    def garbled(message: Message, context) -> Message:
        reply = fit_reply(message, {"epsilon": 1.0})
        reply.content.array_records["fitres.parameters"] = ArrayRecord(
            {"0": Array(dtype="", shape=(), stype="numpy.ndarray", data=b"not an array")})
        return reply

    runner = _runner(tmp_path, garbled, installed_fab)
    runner.policy = EgressPolicy(frozenset({"epsilon"}), require_secure_aggregation=False)
    message = server_message()
    answer = runner.record(message, runner.answer(message, site_context(), installed_fab))
    assert answer.outcome == ERROR and answer.reply.error.code == 1013
    (record,) = runner.egress.verify()
    assert record["outcome"] == ERROR and record["error_code"] == 1013


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL what a test started in a session of its own, unless it ended already (then only reap it)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def _stand_in_supervisor(tmp_path, script: str) -> tuple:
    """A site and a process standing in for its supervisor (``script``)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "manifest.csv").write_text("slide,label\n")
    (tmp_path / "site.yaml").write_text("name: h\ndata: {manifest: manifest.csv}\n")
    config = load_site_config(tmp_path / "site.yaml")
    config.state_dir.mkdir(parents=True, exist_ok=True)
    log_file = config.state_dir / "supernode.log"
    supervisor = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    return config, supervisor, log_file


def test_detached_start_waits_for_the_runner(tmp_path):
    config, supervisor, log_file = _stand_in_supervisor(tmp_path, "import time; time.sleep(30)")
    try:
        EgressLog(config.state_dir).append({"event": "start", "pid": 1})  # an old start: not this one
        before = 1
        EgressLog(config.state_dir).append({"event": "start", "pid": supervisor.pid})
        wait_for_runner(config, supervisor, log_file, 0, before, timeout=5)
        assert supervisor.poll() is None  # ready: the unit keeps running
    finally:
        supervisor.kill()
        supervisor.wait(timeout=60)


def test_detached_start_stops_the_unit_when_the_runner_cannot_start(tmp_path):
    line = "h: the task runner exited with code 2: the lines above say why. Retrying in 2 s"
    script = f"import time; open({str(tmp_path / 'state' / 'supernode.log')!r}, 'a').write({line!r}); time.sleep(30)"
    (tmp_path / "state").mkdir()
    config, supervisor, log_file = _stand_in_supervisor(tmp_path, script)
    try:
        (config.state_dir / "supernode.pid").write_text(f"{supervisor.pid}\n")
        with pytest.raises(SiteStartError, match="the task runner of h exited, so the site was stopped again"):
            wait_for_runner(config, supervisor, log_file, 0, 0, timeout=20)
        assert supervisor.poll() is not None and not (config.state_dir / "supernode.pid").exists()
    finally:
        _kill_group(supervisor)
    config, supervisor, log_file = _stand_in_supervisor(tmp_path / "slow", "import time; time.sleep(30)")
    try:
        with pytest.raises(SiteStartError, match="did not start within 1 s"):
            wait_for_runner(config, supervisor, log_file, 0, 0, timeout=1)
        assert supervisor.poll() is not None
    finally:
        _kill_group(supervisor)


def test_a_started_runner_has_torch_and_opacus_before_its_first_task(tmp_path):
    # In a fresh interpreter (this one has torch already): what build_runner leaves loaded before serving.
    (tmp_path / "manifest.csv").write_text("slide,label\n")
    (tmp_path / "site.yaml").write_text("name: h\ndata: {manifest: manifest.csv}\n")
    script = ("import sys; from client.site_config import load_site_config; "
              "from client.task_runner import build_runner; "
              f"build_runner(load_site_config({str(tmp_path / 'site.yaml')!r}), None); "
              "print(*sorted(m for m in ('torch', 'opacus') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            timeout=600).stdout.split()
    assert loaded == ["opacus", "torch"]
    (record,) = EgressLog(load_site_config(tmp_path / "site.yaml").state_dir).verify()
    assert record["event"] == "start"
