"""The site's task runner: the one process that runs fedpath's ClientApp, and only the installed one.

Flower's default SuperNode (``--isolation subprocess``) installs the app bundle (FAB) the server
submitted and runs the ClientApp *from that bundle*: whoever can submit a run decides which code
runs inside the hospital, the site's own checks included. ``fedpath-site start`` therefore runs
``flower-supernode --isolation process`` (it connects to the consortium and queues messages, but
starts no ClientApp) beside this runner, which takes the SuperNode's tasks from its loopback
Runtime API the way Flower's SuperExec does, and for each task:

1. pulls its input (message, context, run, FAB) as Flower's own ``pull_task_input`` does, but
   waiting at most ``PULL_INPUT_S`` for the message's objects, and no longer once the SuperNode has
   a later task (see ``pull_task_input``);
2. checks the run's bundle: its content digest (``shared/app_bundle.py``) must be the installed
   fedpath version's or be listed in ``federation.allowed_bundles``; otherwise it answers
   ``Error(REFUSAL_ERROR_BASE + 12)`` and runs nothing. The bundle is never installed or imported;
   a message whose federation's privacy ledger is behind the egress log (deleted, or an older copy
   restored) is answered ``Error(REFUSAL_ERROR_BASE + 18)`` and runs nothing (``client/ledger_guard.py``);
3. runs the locally installed ClientApp (``client.app:app``, imported once, in this process: torch
   is imported once and stays warm, and the trunk's hash, its frozen projection and the feature
   cache's entries are read once and kept while their files are unchanged, ``shared/file_memo.py``)
   with the message and context, with a task heartbeat;
4. checks the reply with the site's egress policy (``client/egress_policy.py``); a reply that
   fails is replaced by ``Error(REFUSAL_ERROR_BASE + 14)``, and one whose ledger was replaced while the
   ClientApp ran by ``Error(REFUSAL_ERROR_BASE + 18)``;
5. records what leaves in the site's egress log (``client/egress_log.py``), then pushes the reply
   and the context (SecAgg+ keeps its state there) back to the SuperNode.

Any exception while handling a task is answered with ``Error(REFUSAL_ERROR_BASE + 13)``; its
details go to the site's log only (no error leaves with text, and the task output's ``details``
stays empty), and the runner goes on with the next task.

Only this runner can take the site's tasks: ``fedpath-site start`` writes a fresh random secret
(``state_dir/superexec.secret``, mode 0600) and passes it to both processes; the SuperNode then
requires Flower's SuperExec HMAC authentication on ``AcquireTask`` (Flower supports it with
``--isolation process`` only). Every later call of a task is authenticated by the one-time token
``AcquireTask`` returned.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import httpx
from flwr.app import Context, Error, Message
from flwr.common.constant import SubStatus

# Flower's ClientApp-process plumbing (flwr/supernode/runtime/run_clientapp.py and the modules it uses):
# pull a task's input, push the reply, push the task output. Flower has no public API for a process
# that serves tasks, and re-implementing these would copy its object-tree protocol; they are pinned
# with flwr's version in pyproject.toml and exercised by tests/test_task_runner.py.
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    ObjectUnavailableError,
    pull_and_inflate_object_from_tree,
)
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from client.egress_log import ERROR, REFUSED, SENT, WITHHELD, EgressLog, describe_reply
from client.egress_policy import EgressPolicy, Violation, plan_federation, plan_weight, secagg_stage
from client.ledger_guard import LEDGER_BEHIND, SPENT_KEY, LedgerBehind, LedgerGuard
from client.privacy_ledger import federation_ledger
from client.site_config import SiteConfig, load_site_config
from client.supernode import read_superexec_secret, runtime_address
from shared.app_bundle import BundleError, bundle_digest, installed_bundle_info, normalise_digest
from shared.cli import LOG_DATEFMT, LOG_FORMAT
from shared.errors import UserError
from shared.polling import quarter_step
from shared.refusals import REFUSAL_ERROR_BASE
from shared.server_labels import EscapingFormatter, log_text, server_label

log = logging.getLogger("fedpath.runner")

BUNDLE_NOT_ALLOWED = REFUSAL_ERROR_BASE + 12
HANDLING_FAILED = REFUSAL_ERROR_BASE + 13
POLICY_FAILED = REFUSAL_ERROR_BASE + 14
LEDGER_IS_BEHIND = REFUSAL_ERROR_BASE + LEDGER_BEHIND

COMPONENT = "fedpath-task-runner"
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"  # the one Runtime method SuperExec auth protects
POLL_S, IDLE_POLL_S = 0.1, 1.0
"""Shortest and longest pause between AcquireTask calls while no task is there: a quarter of the time
since the last task ended (``shared/polling.py``). A SecAgg+ round's next stage comes within a second
and is taken within a tenth of one; an idle site asks once a second (Flower's SuperExec's own pace), and
its SuperNode and runner then use about 0.7 % of a core instead of 2.8 % at five asks a second."""
PULL_INPUT_S = 60.0
"""Longest wait for a task's message objects in the SuperNode's local store. They are local (the
SuperNode pulls them from the SuperLink before it confirms the message), so this only ends tasks
that can never complete: Flower 1.42's SuperNode leaves a pending task behind when a run stops
while one of its messages is being received (``RunNotRunningException`` is a BaseException and
skips the clean-up), and its objects never arrive. Flower's own default would wait 2 hours, and
this runner serves one task at a time."""
PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.02, 0.5
"""First and longest pause between asks for a missing object (Flower's defaults: 1 s and 10 s, made for
pulls across the internet). The SuperNode makes a task before it has pulled the message's arrays from the
SuperLink, and this runner takes the task soon after (``POLL_S``): its first ask for the arrays often
comes too early. The asks go to the SuperNode on loopback and cost next to nothing."""
SUPERSEDED_CHECK_S = 1.0
"""While a task's objects are missing, how often the runner asks the SuperNode for a later task. Flower
1.42's SuperNode handles one message at a time: it makes the next task only once the last message was
answered or given up (a stopped run, a failed pull), so a later task means the missing objects will never
come. After a server restart this lets the resumed run's first task start at once instead of after
``PULL_INPUT_S``."""
WAIT_MAX_S = 2.0
"""Longest pause while the SuperNode is unreachable (a refused loopback connection per ask): after a crash its
supervisor restarts a refused SuperNode every 10 s at most (``client/supernode.py``), and the runner, at 10 s
before, noticed it back up to 10 s later, so the site's first task waited."""
REFUSED_RETRY_S = 10.0  # pause after the SuperNode refused the runner's secret (each refusal is logged)


def refusal(message: Message, code: int) -> Message:
    """An error reply with a code and no reason text: nothing but the number leaves the site."""
    return Message(Error(code=code), reply_to=message)


class BundleApproval:
    """Which app bundles this site accepts: the installed fedpath version's, plus the site's list.

    Args:
        installed: content digest of the installed version (None if it cannot be built here:
            then only ``allowed`` bundles run).
        allowed: site.yaml ``federation.allowed_bundles``.
    """

    CACHED = 16  # bundles whose digest is kept (a run repeats its bundle for every message)

    def __init__(self, installed: str | None, allowed: Iterable[str]) -> None:
        self.installed = installed
        self.allowed = frozenset(normalise_digest(d) for d in allowed)
        self._digests: dict[str, str | None] = {}  # sha256 of the bundle's bytes -> content digest

    def digest(self, fab: Fab) -> str | None:
        """The content digest of ``fab`` (None if it is not a readable bundle)."""
        # Keyed by the bytes received, not by the hash the run names (which the server side sets).
        key = hashlib.sha256(fab.content).hexdigest()
        if key not in self._digests:
            try:
                digest: str | None = bundle_digest(fab.content)
            except BundleError as error:
                log.warning("the run's bundle (%d bytes, sha256 %s) cannot be read: %s", len(fab.content), key,
                            log_text(str(error)))  # it names files the server packed: escaped and cut
                digest = None
            if len(self._digests) >= self.CACHED:
                self._digests.pop(next(iter(self._digests)))
            self._digests[key] = digest
        return self._digests[key]

    def allows(self, digest: str | None) -> bool:
        return digest is not None and (digest == self.installed or digest in self.allowed)


@dataclass(frozen=True)
class Answer:
    """What the runner sends for one message, and why."""

    reply: Message
    outcome: str  # egress_log.SENT, REFUSED, ERROR, WITHHELD
    stage: str | None  # SecAgg+ stage of the message answered
    bundle: str | None  # content digest of the run's bundle
    violation: Violation | None = None
    spent: str | None = None  # the federation whose ledger recorded a release for it (client/ledger_guard.py)


class TaskRunner:
    """Serves the SuperNode's ClientApp tasks with the installed ClientApp.

    Args:
        app: the ClientApp to run (``client.app.app``), called as ``app(message=, context=)``.
        approval: which bundles may run.
        policy: the egress policy every reply must pass.
        egress: the site's egress log.
        address: the SuperNode's Runtime API, host:port on loopback.
        secret: the SuperExec auth secret shared with the SuperNode (None: no authentication).
        secret_reader: re-reads the secret after the SuperNode refused it (a restarted site).
        guard: compares each federation's ledger with the egress log (None: no check, tests only).
        site_yaml: the site.yaml the ClientApp reads for every message; a message is refused once it names
            another ``state_dir`` than the guard's (None: not checked, tests only).
    """

    def __init__(self, app: Callable[..., Message], approval: BundleApproval, policy: EgressPolicy,
                 egress: EgressLog, address: str, secret: bytes | None,
                 secret_reader: Callable[[], bytes] | None = None, guard: LedgerGuard | None = None,
                 site_yaml: Path | None = None) -> None:
        self.app, self.approval, self.policy, self.egress, self.guard = app, approval, policy, egress, guard
        self.site_yaml = site_yaml
        self.address, self.secret, self.secret_reader = address, secret, secret_reader
        self._later: tuple[str, int] | None = None  # (token, task id) acquired while a task waited

    # One message: decide the reply. Never raises.
    def answer(self, message: Message, context: Context, fab: Fab) -> Answer:
        """The reply to ``message``: a refusal for a bundle that is not allowed or a federation whose ledger
        is behind, else the installed ClientApp's reply if it passes the egress policy and its ledger was not
        replaced meanwhile; an error code for anything that fails."""
        stage, bundle = None, None
        try:
            stage = secagg_stage(message)  # before the ClientApp runs: Flower's SecAgg+ mod pops it
            weight = plan_weight(message)
            bundle = self.approval.digest(fab)
            what = _what(message, stage)
            if not self.approval.allows(bundle):
                log.warning("%s: refused (code %d): the run's app bundle %s is neither this site's installed fedpath "
                            "(%s) nor in federation.allowed_bundles; nothing ran", what, BUNDLE_NOT_ALLOWED,
                            f"sha256:{bundle}" if bundle else "(unreadable)", self.approval.installed)
                return Answer(refusal(message, BUNDLE_NOT_ALLOWED), REFUSED, stage, bundle)
            federation = plan_federation(message) if self.guard is not None else None
            try:
                if federation is not None:
                    self._same_state_dir()
                releases = self.guard.before(federation) if federation is not None else None
            except LedgerBehind as behind:
                log.error("%s: refused (code %d): %s", what, LEDGER_IS_BEHIND, behind)
                return Answer(refusal(message, LEDGER_IS_BEHIND), REFUSED, stage, bundle)
            log.info("%s: running the ClientApp", what)
            reply = self.app(message=message, context=context)
            if not isinstance(reply, Message) or reply.metadata.reply_to_message_id != message.metadata.message_id:
                raise TypeError(f"the ClientApp returned {type(reply).__name__}, not a reply to the message")
            violation = self.policy.check(reply, stage, weight)
            if violation is not None:
                log.error("%s: the ClientApp's reply failed the egress policy and was withheld (code %d): %s",
                          what, POLICY_FAILED, violation)
                return Answer(refusal(message, POLICY_FAILED), WITHHELD, stage, bundle, violation)
            try:
                spent = federation if federation is not None and self.guard.spent(federation, releases) else None
            except LedgerBehind as behind:
                log.error("%s: the reply is withheld (code %d): %s", what, LEDGER_IS_BEHIND, behind)
                return Answer(refusal(message, LEDGER_IS_BEHIND), WITHHELD, stage, bundle,
                              Violation("ledger", str(federation_ledger(".", federation)), str(behind)))
            return Answer(reply, SENT, stage, bundle, spent=spent)
        except (Exception, SystemExit):  # SystemExit: a library calling sys.exit must not end the runner
            log.exception("%s: failed; answering with code %d and no text (the details stay in this log)",
                          _what(message, stage), HANDLING_FAILED)
            return Answer(refusal(message, HANDLING_FAILED), ERROR, stage, bundle)

    def _same_state_dir(self) -> None:
        """Raise LedgerBehind once site.yaml names another state_dir than the runner started with: the
        ClientApp would find no ledger there and plan afresh, and the guard would watch the old folder."""
        if self.site_yaml is None:
            return
        now = Path(load_site_config(self.site_yaml).state_dir)
        if now.resolve() != self.guard.state_dir.resolve():
            raise LedgerBehind(f"{self.site_yaml} now names state_dir {now}, the site started with "
                               f"{self.guard.state_dir}: restart the site (`fedpath-site stop`, `start`) to use it")

    def record(self, message: Message, answer: Answer) -> Answer:
        """Write ``answer`` to the egress log before it leaves. A reply that cannot be described is
        replaced by error code 13 (recorded); a log that cannot be written (disk full, a chain
        someone broke) lets only a bare error code leave, and says so loudly."""
        try:
            entry = describe_reply(message, answer.reply, answer.stage, answer.outcome, answer.bundle,
                                   answer.violation)
            if answer.spent is not None:
                entry[SPENT_KEY] = answer.spent
        except Exception:  # noqa: BLE001 - what cannot be described does not leave
            log.exception("%s: the reply cannot be described for the egress log; answering with code %d instead",
                          _what(message, answer.stage), HANDLING_FAILED)
            answer = Answer(refusal(message, HANDLING_FAILED), ERROR, answer.stage, answer.bundle)
            entry = describe_reply(message, answer.reply, answer.stage, answer.outcome, answer.bundle)
        try:
            self.egress.append(entry)
            if answer.spent is not None:
                self.guard.note_sent(answer.spent)
            return answer
        except Exception:  # noqa: BLE001 - whatever failed, nothing unrecorded leaves but a bare code
            log.exception("CANNOT WRITE THE EGRESS LOG %s: the reply is replaced by error code %d, which leaves "
                          "unrecorded; fix the log (`fedpath-site egress verify`) and restart the site",
                          self.egress.path, HANDLING_FAILED)
            return Answer(refusal(message, HANDLING_FAILED), ERROR, answer.stage, answer.bundle)

    # The Runtime API.
    def serve_forever(self) -> None:
        """Acquire and serve ClientApp tasks until the process is stopped."""
        acquirer = self._acquire_client()
        waiting, pause = False, POLL_S
        idle_since = time.monotonic()
        while True:
            if self._later is not None:  # found while an earlier task waited for objects that never came
                (token, task_id), self._later = self._later, None
                self._serve_logged(acquirer, token, task_id)
                idle_since = time.monotonic()
                continue
            try:
                response = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            except httpx.TransportError as error:
                if not waiting:
                    log.info("waiting for the SuperNode's Runtime API at %s (%s)", self.address, type(error).__name__)
                waiting, pause = True, min(2 * pause, WAIT_MAX_S)
                time.sleep(pause)
                continue
            except httpx.HTTPStatusError as error:
                log.error("the SuperNode at %s answered AcquireTask with HTTP %d: %s", self.address,
                          error.response.status_code, _auth_hint(error.response.status_code))
                if self.secret_reader is not None and error.response.status_code in (401, 403):
                    self.secret = self.secret_reader()
                    acquirer.close()
                    acquirer = self._acquire_client()
                time.sleep(REFUSED_RETRY_S)
                continue
            if waiting:
                log.info("connected to the SuperNode's Runtime API at %s", self.address)
                waiting, pause = False, POLL_S
            if response.HasField("task") and response.token:
                self._serve_logged(acquirer, response.token, response.task.task_id)
                idle_since = time.monotonic()
            else:
                time.sleep(quarter_step(time.monotonic() - idle_since, POLL_S, IDLE_POLL_S))

    def _serve_logged(self, acquirer: RuntimeHttpClient, token: str, task_id: int) -> None:
        try:
            self.serve_task(token, task_id, self._later_task_check(acquirer))
        except Exception:  # noqa: BLE001 - one task's failure must not end the runner
            log.exception("task %d: failed while talking to the SuperNode; going on with the next task", task_id)

    def _later_task_check(self, acquirer: RuntimeHttpClient) -> Callable[[], bool]:
        """True once the SuperNode has a task after the one being pulled (kept in ``_later``, served
        next); asks at most every ``SUPERSEDED_CHECK_S``, the first time one interval after the task
        began (its arrays normally arrive well within it: no extra request in an ordinary exchange).
        Called from the object-pulling threads."""
        lock, asked = threading.Lock(), [time.monotonic()]

        def superseded() -> bool:
            with lock:
                if self._later is not None:
                    return True
                if time.monotonic() - asked[0] < SUPERSEDED_CHECK_S:
                    return False
                asked[0] = time.monotonic()
                try:
                    response = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                except httpx.HTTPError:
                    return False  # unknown: keep waiting, up to PULL_INPUT_S
                if response.HasField("task") and response.token:
                    self._later = (response.token, response.task.task_id)
                    return True
                return False

        return superseded

    def serve_task(self, token: str, task_id: int, superseded: Callable[[], bool] = lambda: False) -> None:
        """Pull one task's input, answer it, record and push the reply and the context back.

        Args:
            token: the task's one-time token from ``AcquireTask``.
            task_id: the task's id.
            superseded: true when the SuperNode has moved on to a later task (stop waiting for input).
        """
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name=COMPONENT), RuntimeTokenHttpInterceptor(token)],
            retry_invoker=_task_retry_invoker())
        heartbeat = HeartbeatSender(_heartbeat_fn(client, task_id))
        heartbeat.start()
        context = None
        try:
            try:
                message, context, _run, fab = pull_task_input(client, PULL_INPUT_S, superseded)
            except TaskSuperseded as error:
                log.warning("task %d: %s; giving it up", task_id, error)
                push_task_output(client=client, context=None, sub_status=SubStatus.FAILED, details="")
                return
            except Exception:  # noqa: BLE001 - no message to answer: Flower's own ClientApp process does the same
                log.exception("task %d: its input could not be pulled from the SuperNode", task_id)
                push_task_output(client=client, context=None, sub_status=SubStatus.FAILED, details="")
                return
            answer = self.record(message, self.answer(message, context, fab))
            try:
                push_message(client, answer.reply, context)
            except Exception:  # noqa: BLE001
                log.exception("%s: the reply could not be handed to the SuperNode", _what(message, answer.stage))
                self._note_push_failure()
            # details stays empty: the SuperNode keeps it, and no text describes a failure outside this log
            push_task_output(client=client, context=context, sub_status=SubStatus.COMPLETED, details="")
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()

    def _note_push_failure(self) -> None:
        try:
            last = self.egress.chain.last_record()
            self.egress.append({"event": "push-failed", "record": last["index"] if last else None})
        except Exception:  # noqa: BLE001 - already logged above; the egress log's own failure is logged here
            log.exception("cannot note the failed push in the egress log")

    def _acquire_client(self) -> RuntimeHttpClient:
        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=COMPONENT)]
        if self.secret:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=self.secret,
                                                             protected_methods={ACQUIRE_METHOD}))
        # No retry invoker: Flower's stock one stops the process on HTTP 401 and raises on 403,
        # which suits a one-task ClientApp process, not a long-lived runner; serve_forever retries.
        return RuntimeHttpClient.from_server_address(server_address=self.address, insecure=True,
                                                     root_certificates=None, interceptors=interceptors)


class TaskSuperseded(Exception):
    """The SuperNode has a later task: the objects of this one will never arrive."""


def pull_task_input(client: RuntimeHttpClient, max_time: float, superseded: Callable[[], bool] = lambda: False,
                    ) -> tuple[Message, Context, Any, Fab]:
    """A task's message, context, run and FAB, as Flower's ``run_clientapp.pull_task_input`` pulls them
    (the same Runtime API calls and object-tree inflation, and the same task identity for the process),
    but giving up after ``max_time`` seconds instead of Flower's default two hours, or as soon as
    ``superseded()`` says the SuperNode moved on (``TaskSuperseded``).

    Args:
        client: a Runtime API client carrying the task's token.
        max_time: longest wait, in seconds, for the message's objects.
        superseded: asked while an object is missing (see ``until_superseded``).
    """
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context, run, fab = context_from_proto(res.context), run_from_proto(res.run), fab_from_proto(res.fab)
    messages = client.PullMessages(PullAppMessagesRequest())
    if not messages.messages_list:
        raise RuntimeError("the SuperNode holds no message for this task")
    node, tree = Node(node_id=context.node_id), messages.message_object_trees[0]
    try:
        message = pull_and_inflate_object_from_tree(
            tree, until_superseded(make_pull_object_fn_protobuf(client.PullObject, node, context.run_id), superseded),
            make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
            return_type=Message, max_time=max_time, initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S)
    except ObjectPullError as error:
        if isinstance(error.__cause__, TaskSuperseded):
            raise error.__cause__ from None
        raise
    # A deflated message lacks its own id, and Metadata has no public setter for it: Flower's own
    # pull_task_input (run_clientapp.py) sets it exactly this way; the only private name used here.
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


def until_superseded(pull: Callable[[str], bytes], superseded: Callable[[], bool]) -> Callable[[str], bytes]:
    """``pull`` (one object's content by id), which while the object is still missing also asks
    ``superseded()``, and ends the whole pull (Flower's ``ObjectPullError``, caused by
    ``TaskSuperseded``) when it says yes."""

    def pull_object(object_id: str) -> bytes:
        try:
            return pull(object_id)
        except ObjectUnavailableError:
            if superseded():
                raise ObjectPullError(object_id, "superseded") from TaskSuperseded(
                    "the SuperNode moved on to a later task; this one's message will never arrive whole")
            raise

    return pull_object


def _task_retry_invoker() -> RetryInvoker:
    """A task's calls survive short transport hiccups (bounded), and never stop the process."""
    return RetryInvoker(lambda: exponential(max_delay=5), httpx.TransportError, max_tries=6, max_time=60)


def _heartbeat_fn(client: RuntimeHttpClient, task_id: int) -> Callable[[], bool]:
    """Flower's task heartbeat, minus its reaction to a lost task (it signals SIGINT to its own
    process: right for a one-task ClientApp process, fatal for this runner)."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            response = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False  # retried by HeartbeatSender
        except httpx.HTTPStatusError as error:
            if error.response.status_code in (503, 504):
                return False
            log.warning("task %d: heartbeat refused (HTTP %d)", task_id, error.response.status_code)
            return True
        except Exception:  # noqa: BLE001 - the heartbeat thread must not die while the task runs
            log.exception("task %d: heartbeat failed", task_id)
            return False
        if not response.success:
            log.warning("task %d: the SuperNode no longer holds this task (it expired or the run stopped)", task_id)
        return True

    return beat


def _auth_hint(status: int) -> str:
    if status in (401, 403):
        return ("it refused this runner's SuperExec credentials: the SuperNode and the runner must be started "
                "together by `fedpath-site start` (they share state_dir/superexec.secret); retrying")
    return "retrying"


def _what(message: Message, stage: str | None) -> str:
    """How the site's log names a message (the server's names only when short and plain)."""
    metadata = message.metadata
    kind = server_label(metadata.message_type) + (f"/{server_label(stage)}" if stage else "")
    return f"run {metadata.run_id} round {server_label(metadata.group_id) or '-'} {kind}"


WARM_CACHE_BYTES = 4 << 30
"""Feature-cache entries the runner keeps between rounds; a site with more keeps the most recent 4 GiB."""
WARM_DEVICE_SHARE = 0.25
"""On a GPU, the share of its memory the runner fills with training vectors kept between rounds (the rest
is for the model, Opacus' per-sample gradients and anything else the hospital runs there)."""


def build_runner(config: SiteConfig, secret: bytes | None, site_yaml: Path | None = None) -> TaskRunner:
    """The runner of a site: its egress log opened and verified, the installed version's digest,
    the ClientApp imported, its ledger guard built; a ``start`` record written. Raises UserError with
    what to fix.

    Args:
        config: the site's configuration as read at start.
        secret: the SuperExec auth secret shared with the SuperNode (None: no authentication).
        site_yaml: the file ``config`` was read from: a message is refused once it names another
            ``state_dir`` (``TaskRunner._same_state_dir``).
    """
    egress = EgressLog(config.state_dir)
    records = egress.open_for_writing()
    # built whatever privacy.enabled says now: the ClientApp reads site.yaml again for every message
    guard = LedgerGuard(config.state_dir, records)
    try:
        info = installed_bundle_info()
        installed, version, app_dir = info.digest, info.version, str(info.app_dir)
    except BundleError as error:
        if not config.federation.allowed_bundles:
            raise UserError(f"{error}; without it this site can only run bundles listed in "
                            "federation.allowed_bundles, and that list is empty") from None
        log.warning("%s; only the bundles in federation.allowed_bundles will run", error)
        installed, version, app_dir = None, None, None
    approval = BundleApproval(installed, config.federation.allowed_bundles)
    policy = EgressPolicy.for_site(config)
    # federated_round, private_training: what a training message needs (torch, Opacus; 4 s here, over 10 s
    # beside other work), imported now: in the first round it counted against the server's round_timeout.
    import torch

    from client import feature_cache, federated_round, private_training  # noqa: F401
    from client.app import app  # the installed ClientApp, imported once for every task
    from shared.devices import use_threads

    use_threads(config.features.threads)  # every round's training runs in this process

    # This process serves every round: keep the feature cache's entries between them (shared/file_memo.py),
    # and on a GPU the training vectors too (client/sequence_data.py: DEVICE_ENTRIES).
    feature_cache.WARM_ENTRIES.max_bytes = WARM_CACHE_BYTES
    feature_cache.WARM_DEVICE_SHARE = WARM_DEVICE_SHARE

    egress.append({"event": "start", "version": version, "app_digest": installed, "app_dir": app_dir,
                   "allowed_bundles": sorted(approval.allowed), "disclose": sorted(config.disclose),
                   "require_secure_aggregation": config.federation.require_secure_aggregation,
                   "pid": os.getpid(), **guard.start_fields()})
    log.info("%s: task runner for fedpath %s (bundle sha256:%s), SuperNode Runtime API %s, %d torch thread(s); "
             "egress log %s", config.name, version, installed, runtime_address(config), torch.get_num_threads(),
             egress.path)
    return TaskRunner(app, approval, policy, egress, runtime_address(config), secret,
                      secret_reader=lambda: read_superexec_secret(config), guard=guard, site_yaml=site_yaml)


def configure_site_log() -> None:
    """The runner's log (the SuperNode's log file): INFO and up, exceptions escaped (``EscapingFormatter``)."""
    logging.basicConfig(level=logging.INFO)
    formatter = EscapingFormatter(LOG_FORMAT, datefmt=LOG_DATEFMT)
    for handler in logging.getLogger().handlers:  # Flower sets its own logger to DEBUG: keep the site log readable
        handler.setLevel(logging.INFO)
        handler.setFormatter(formatter)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise


def main(argv: list[str] | None = None) -> int:
    """``python -m client.task_runner SITE_YAML``: started by `fedpath-site start` beside the SuperNode.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(prog="python -m client.task_runner", description=__doc__.split("\n")[0])
    parser.add_argument("site_yaml", help="the site's site.yaml")
    args = parser.parse_args(argv)
    configure_site_log()
    try:
        config = load_site_config(args.site_yaml)
        runner = build_runner(config, read_superexec_secret(config), Path(args.site_yaml))
    except UserError as error:
        print(f"fedpath task runner: error: {error}", file=sys.stderr, flush=True)
        return 2
    try:
        runner.serve_forever()
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
