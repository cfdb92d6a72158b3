"""The pull relay (server/pull_relay.py): what it holds, for how long, what it passes on at once,
and that it never asks on behalf of a site that has left.

The relay runs as its own process here (the command `fedpath-server start` runs) in front of a
stand-in for the SuperLink that answers with Flower's own protobuf messages and counts what it is
asked. Through real Flower processes: tests/test_site_runner.py (every pull of a SecAgg+ run goes
through the relay) and benchmarks/round_overhead.py.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import socket
import subprocess
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse, PushMessagesResponse, Reconnect
from flwr.proto.message_pb2 import (
    Message,
    PullObjectRequest,
    PullObjectResponse,
    PushObjectRequest,
    PushObjectResponse,
)
from flwr.proto.node_pb2 import Node

from server.pull_relay import (
    ACTIVE_S,
    ANNOUNCED_STEP_S,
    HELD_ROUTES,
    IDLE_STEP_S,
    OBJECT_HOLD_S,
    PUSH_MESSAGES,
    PUSH_OBJECT,
    Answer,
    Wakeup,
    WarmConnections,
    bind_listener,
    hold,
    message_step,
    no_message,
    object_not_ready,
    relay_command,
)
from server.push_gate import PUSHES_PER_SITE, PushGate
from server.relay_signals import (
    STALE_PUSH_S,
    Announcements,
    PushTracker,
    RelayLink,
    bind_wake_port,
    write_wake_file,
)
from shared.processes import stop_pid
from shared.site_keys import public_key_line

EMPTY = PullMessagesResponse().SerializeToString()
A_MESSAGE = PullMessagesResponse(messages_list=[Message()]).SerializeToString()
PULL, PULL_OBJECT = "/v1/fleet/pull-messages", "/v1/fleet/pull-object"


def _answer(body: bytes, status: int = 200) -> Answer:
    return Answer(status, "OK", [("Content-Type", "application/protobuf")], body)


class _Clock:
    """Time that moves only when the relay waits; the route counts as in use unless ``idle``, and
    the ServerApp as announcing its messages if ``announcing``."""

    generation = 0

    def __init__(self, idle: bool = False, announcing: bool = False) -> None:
        self.now = 0.0
        self.waits: list[float] = []
        self.idle, self._announcing = idle, announcing

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float, since: int) -> None:
        self.waits.append(seconds)
        self.now += seconds

    def wake(self, now: float, announced: bool = False) -> None:
        pass

    def active(self, now: float) -> bool:
        return not self.idle

    def announcing(self, now: float) -> bool:
        return self._announcing


def _hold(answers: list[bytes], hold_s: float = 10.0, route: str = PULL, still_wanted=lambda: True,
          idle: bool = False, announcing: bool = False):
    clock, asked = _Clock(idle, announcing), []

    def ask() -> Answer:
        asked.append(clock.now)
        return _answer(answers[min(len(asked), len(answers)) - 1])

    answer = hold(ask, HELD_ROUTES[route], hold_s, still_wanted, wakeup=clock, clock=clock)
    return answer, asked, clock.waits


def test_empty_pulls_are_asked_again_until_the_message_is_there():
    answer, asked, waits = _hold([EMPTY] * 6 + [A_MESSAGE])
    assert answer.body == A_MESSAGE and len(asked) == 7
    # a quarter of the time already waited, from 0.1 s up to 0.5 s
    assert waits == [message_step(t) for t in asked[:-1]] and waits[0] == 0.1
    assert all(0.1 <= w <= 0.5 for w in waits) and waits == sorted(waits)


def test_with_no_message_delivered_for_a_minute_the_relay_asks_every_2_s():
    """No run (or between runs): each ask costs the SuperLink CPU, so few asks; the first message
    of a run then wakes the route."""
    answer, asked, waits = _hold([EMPTY] * 3 + [A_MESSAGE], idle=True)
    assert answer.body == A_MESSAGE and waits == [IDLE_STEP_S] * 3
    wakeup = Wakeup()
    assert not wakeup.active(time.monotonic())
    wakeup.wake(time.monotonic())
    assert wakeup.active(time.monotonic()) and not wakeup.active(time.monotonic() + ACTIVE_S)


def test_while_the_serverapp_announces_its_messages_a_held_pull_asks_only_every_2_s():
    """The announcement wakes it when a message is there; asking often would only cost the SuperLink."""
    answer, asked, waits = _hold([EMPTY] * 3 + [A_MESSAGE], announcing=True)
    assert answer.body == A_MESSAGE and waits == [ANNOUNCED_STEP_S] * 3
    answer, asked, waits = _hold([EMPTY] * 3 + [A_MESSAGE], announcing=True, idle=True)
    assert waits == [ANNOUNCED_STEP_S] * 3
    # objects are not announced: held pulls of an object still ask every 0.05 s
    not_yet = PullObjectResponse(object_found=True, object_available=False).SerializeToString()
    _, _, waits = _hold([not_yet] * 2 + [EMPTY], route="/v1/fleet/pull-object", announcing=True)
    assert waits == [0.05] * 2
    wakeup = Wakeup()
    assert not wakeup.announcing(time.monotonic())
    wakeup.wake(time.monotonic(), announced=True)
    assert wakeup.announcing(time.monotonic()) and wakeup.active(time.monotonic())
    assert not wakeup.announcing(time.monotonic() + ACTIVE_S)


class _RecordingWakeup(Wakeup):
    def __init__(self) -> None:
        super().__init__()
        self.woken_before_waiting: list[bool] = []

    def wait(self, seconds: float, since: int) -> None:
        self.woken_before_waiting.append(self.generation != since)
        super().wait(seconds, since)


def test_an_announcement_during_an_ask_is_not_slept_through():
    """The ServerApp may push and announce while a held pull's ask is on its way: the SuperLink said
    "no message", but the next ask must follow at once, not after the 2 s step."""
    wakeup, asked = _RecordingWakeup(), []
    wakeup.wake(time.monotonic(), announced=True)  # the ServerApp announces its messages

    def ask() -> Answer:
        asked.append(1)
        if len(asked) == 1:  # the message is pushed and announced just after the SuperLink answered
            wakeup.wake(time.monotonic(), announced=True)
            return _answer(EMPTY)
        return _answer(A_MESSAGE)

    answer = hold(ask, HELD_ROUTES[PULL], 10.0, lambda: True, wakeup=wakeup)
    assert answer.body == A_MESSAGE and len(asked) == 2
    assert wakeup.woken_before_waiting == [True]


def test_the_serverapp_announces_only_to_the_relays_loopback_port_and_hears_only_the_relay(tmp_path):
    wake_file = tmp_path / "pull_relay.wake"
    link = RelayLink(wake_file)
    assert not link.announce()  # no relay (a simulation): nothing sent, no error
    for text in ("10.0.0.7:9999 token\n", "127.0.0.1:99999 token\n", "not an address\n", "127.0.0.1:80\n"):
        wake_file.write_text(text)  # the start command writes a loopback port and a token, nothing else
        assert not link.announce()
    with bind_wake_port() as wake, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        write_wake_file(wake_file, wake)
        assert wake_file.stat().st_mode & 0o077 == 0  # the token is the server user's alone
        token = wake_file.read_text().split()[1].encode()
        wake.settimeout(10)
        assert link.announce()
        data, sender = wake.recvfrom(64)
        assert data == b"pushed " + token and sender[:2] == link.address
        stranger.sendto(b"replies", link.address)  # anyone else: dropped by the kernel (connected socket)
        assert not link.wait_for_replies(0.3) and not link.heard
        wake.sendto(b"something else", sender)
        assert not link.wait_for_replies(0.3)
        wake.sendto(b"replies", sender)  # the relay's answer
        assert link.wait_for_replies(10) and link.heard
    link.close()


def test_a_flood_on_the_wake_port_wakes_the_held_pulls_a_few_times_and_a_stranger_not_at_all():
    """A local program may send what it likes to the wake port: without the token of pull_relay.wake it
    is ignored (and never told anything); with it, what comes during the pause after a wake makes one
    more wake (at most 1 / spacing_s asks per held pull each second)."""
    woken = _Counter()
    with bind_wake_port() as wake, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as serverapp:
        announcements = Announcements(wake, b"s3cret", woken, spacing_s=0.2)
        listener = threading.Thread(target=announcements.listen, daemon=True)
        listener.start()
        stranger.bind(("127.0.0.1", 0))
        stranger.settimeout(0.3)
        for _ in range(200):
            stranger.sendto(b"pushed wrong", wake.getsockname())
        stranger.sendto(b"pushed ", wake.getsockname())
        time.sleep(0.5)
        assert woken.calls == 0
        announcements.replies_complete()  # no announcer yet: nothing sent, to the stranger least of all
        with pytest.raises(TimeoutError):
            stranger.recv(64)
        serverapp.bind(("127.0.0.1", 0))
        for _ in range(200):
            serverapp.sendto(b"pushed s3cret", wake.getsockname())
        deadline = time.monotonic() + 10
        while not woken.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(1.5)
        assert 1 <= woken.calls <= 3  # 200 datagrams: a wake, one more for those of its pause
        announcements.replies_complete()  # to the announcer
        serverapp.settimeout(10)
        assert serverapp.recv(64) == b"replies"
        announcements.stop()
        listener.join(timeout=10)
        assert not listener.is_alive()


class _Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def _pushed_messages(objects: list[str], session: str) -> bytes:
    return PushMessagesResponse(objects_to_push=objects, session_id=session).SerializeToString()


def _pushed_object(object_id: str, session: str) -> bytes:
    return PushObjectRequest(object_id=object_id, session_id=session, object_content=b"x" * 100).SerializeToString()


def test_replies_count_as_arriving_until_the_last_object_the_superlink_asked_for_is_pushed():
    complete, now = _Counter(), [0.0]
    tracker = PushTracker(complete, clock=lambda: now[0])
    tracker.messages_starting()  # site 1's reply: listed to the ServerApp from here on
    tracker.messages_starting()  # site 2's
    assert tracker.arriving() == 2
    tracker.messages_pushed(["a", "b"], "s1")
    tracker.messages_pushed(["c"], "s2")
    tracker.object_pushed("s1", "a")
    tracker.object_pushed("s2", "c")  # site 2 is complete, site 1 is not
    tracker.object_pushed("another session", "b")
    assert complete.calls == 0 and tracker.arriving() == 1
    tracker.object_pushed("s1", "b")
    assert complete.calls == 1 and tracker.arriving() == 0
    # a push the SuperLink refused (a stranger's, unsigned) completes nothing: no signal
    tracker.messages_starting()
    tracker.messages_pushed(None)
    assert complete.calls == 1 and tracker.arriving() == 0
    # nothing to push (the SuperLink had every object): complete at once
    tracker.messages_starting()
    tracker.messages_pushed([], "s3")
    assert complete.calls == 2
    # a site that dies mid-push is given up STALE_PUSH_S after its last object; one still pushing is not
    tracker.messages_starting()
    tracker.messages_pushed(["d", "e"], "s4")
    tracker.messages_starting()
    tracker.messages_pushed(["f", "g"], "s5")
    now[0] += STALE_PUSH_S - 1
    tracker.object_pushed("s5", "f")  # s5 is alive
    now[0] += 2
    tracker.object_pushed("s5", "g")  # s5 complete; s4 stale: given up
    assert complete.calls == 3 and tracker.arriving() == 0


def test_a_connection_is_reused_only_while_fresh():
    class Opened:
        def __init__(self) -> None:
            self.closed = False

        def close(self) -> None:
            self.closed = True

    class Upstreams:
        def connect(self, timeout: float) -> Opened:
            return Opened()

    warm = WarmConnections(Upstreams(), 300.0, fresh_s=0.3)
    first = warm.take()
    warm.give_back(first, reusable=True)
    assert warm.take() is first  # an answer a moment ago: the SuperLink keeps it open
    warm.give_back(first, reusable=False)  # the SuperLink said it closes it
    assert first.closed and warm.take() is not first
    second = warm.take()
    warm.give_back(second, reusable=True)
    time.sleep(0.4)
    assert warm.take() is not second and second.closed  # idle too long: never risk a push on it


def test_a_hold_stays_the_whole_hold_while_announcements_come():
    """A short configured hold (pull_hold_s: 1) is held whole, not cut at the first 2 s step."""
    answer, asked, waits = _hold([EMPTY], hold_s=1.0, announcing=True)
    assert no_message(answer) and waits == [1.0] and len(asked) == 2


def test_a_hold_ends_after_hold_s_with_the_empty_answer():
    answer, asked, waits = _hold([EMPTY], hold_s=3.0)
    assert no_message(answer)
    assert sum(waits) <= 3.0 < sum(waits) + message_step(sum(waits))
    assert len(asked) == len(waits) + 1 > 5
    answer, asked, _ = _hold([EMPTY, A_MESSAGE], hold_s=0)  # 0: ask once (the relay is then off)
    assert answer.body == EMPTY and len(asked) == 1


def test_no_more_asks_for_a_site_that_has_left():
    """Asking again after the site closed its connection could take a message nobody will read."""
    calls = iter([True, True, False])
    answer, asked, _ = _hold([EMPTY] * 5 + [A_MESSAGE], still_wanted=lambda: next(calls))
    assert no_message(answer) and len(asked) == 3


@pytest.mark.parametrize("answer", [
    _answer(b"", 401), _answer(b"", 403), _answer(EMPTY, 500),  # refusals and errors: the site sees them at once
    _answer(b"not protobuf"),
    _answer(PullMessagesResponse(reconnect=Reconnect(reconnect=5)).SerializeToString()),
    Answer(200, "OK", [("Content-Encoding", "gzip")], EMPTY),
])
def test_anything_but_an_empty_answer_is_passed_on_at_once(answer):
    asked = []
    result = hold(lambda: asked.append(1) or answer, HELD_ROUTES[PULL], 10.0, lambda: True, wakeup=_Clock())
    assert result is answer and len(asked) == 1


def test_an_announced_object_is_waited_for_but_a_missing_one_is_not():
    not_yet = PullObjectResponse(object_found=True, object_available=False).SerializeToString()
    ready = PullObjectResponse(object_found=True, object_available=True, object_content=b"x").SerializeToString()
    missing = PullObjectResponse(object_found=False).SerializeToString()
    assert object_not_ready(_answer(not_yet)) and not object_not_ready(_answer(ready))
    assert not object_not_ready(_answer(missing))  # Flower reports it as an error: no reason to wait
    answer, asked, waits = _hold([not_yet] * 3 + [ready], route=PULL_OBJECT)
    assert answer.body == ready and len(asked) == 4 and waits == [0.05] * 3
    answer, asked, waits = _hold([not_yet], hold_s=10.0, route="/v1/fleet/pull-object")
    assert sum(waits) <= OBJECT_HOLD_S and answer.body == not_yet  # held 5 s at most, whatever hold_s says


def test_a_message_for_one_site_wakes_every_held_site():
    """The server sends a round's messages to all sites together: the first held pull that finds
    its message makes the others ask at once instead of after their step."""
    wakeup = Wakeup()
    woke, since = threading.Event(), wakeup.generation  # read first: a wake-up before the wait still counts
    waiter = threading.Thread(target=lambda: (wakeup.wait(60, since), woke.set()), daemon=True)
    waiter.start()
    answer = hold(lambda: _answer(A_MESSAGE), HELD_ROUTES[PULL], 10.0, lambda: True, wakeup=wakeup)
    assert answer.body == A_MESSAGE
    assert woke.wait(10), "the held request was not woken"


# --- the relay process -------------------------------------------------------------------------------


class _StandIn(http.server.ThreadingHTTPServer):
    """Answers pull-messages with "no message" until ``messages_after`` asks, then with one."""

    daemon_threads = True
    request_queue_size = 64  # the relay opens a connection per held pull: 20 at once overflowed socketserver's 5

    def __init__(self, messages_after: int, first_message: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _StandInHandler)
        self.messages_after, self.asks, self.asked_at, self.peers, self.keys = messages_after, [], [], [], []
        self.first_message = first_message  # the first ask also gets a message (a run under way)


class _StandInHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _StandIn

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        headers = self.headers
        self.server.asks.append((self.path, body, headers.get("flwr-signature"), headers.get("flwr-timestamp")))
        self.server.keys.append(headers.get("flwr-public-key"))
        self.server.asked_at.append(time.monotonic())  # one clock for every process of this machine
        self.server.peers.append(self.client_address)  # which connection of the relay's
        if self.headers.get("flwr-signature") in (None, "forged"):  # a real signature or the pull tests' "signed"
            self.send_response(401)
            payload = b""
        else:
            self.send_response(200)
            first = self.server.first_message and len(self.server.asks) == 1
            payload = A_MESSAGE if first or len(self.server.asks) > self.server.messages_after else EMPTY
            if self.path == PUSH_MESSAGES:  # the reply's two objects are still to come
                payload = _pushed_messages(["o1", "o2"], "session-1")
            elif self.path == PUSH_OBJECT:
                payload = PushObjectResponse(stored=True).SerializeToString()
            elif self.path == PULL_OBJECT:  # named by a pushed reply, never sent: "not yet" for good
                payload = PullObjectResponse(object_found=True, object_available=False).SerializeToString()
        self.send_header("Content-Type", "application/protobuf")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def relay(tmp_path):
    """A relay process in front of a stand-in SuperLink (plain HTTP, as with --insecure)."""
    started = []

    def launch(messages_after: int, hold_s: float = 10.0, first_message: bool = False):
        upstream = _StandIn(messages_after, first_message)
        threading.Thread(target=upstream.serve_forever, daemon=True).start()
        listener, wake, wake_file = bind_listener("127.0.0.1"), bind_wake_port(), tmp_path / "pull_relay.wake"
        registry = _registry(tmp_path / "sites.json", SITE_KEY, OTHER_SITE_KEY)
        with listener, wake, (tmp_path / "relay.log").open("ab") as log:
            write_wake_file(wake_file, wake)
            command = relay_command(listener, upstream.server_address, None, hold_s, 64, registry, (wake, wake_file))
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       pass_fds=(listener.fileno(), wake.fileno()), start_new_session=True)
            port = listener.getsockname()[1]
        started.append((process, upstream))
        return port, upstream

    yield launch
    for process, upstream in started:
        stop_pid(process.pid)
        upstream.shutdown()
        upstream.server_close()


SITE_KEY, OTHER_SITE_KEY = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
"""Registered sites' keys: pushes pass the relay only with such a signature (``PushGate``)."""


def _registry(path: Path, *keys: ec.EllipticCurvePrivateKey) -> Path:
    sites = {f"site-{i}": {"node_id": i, "public_key": public_key_line(key.public_key()), "fingerprint": f"SHA256:{i}",
                           "registered": "2026-12-05T00:00:00+00:00"} for i, key in enumerate(keys)}
    path.write_text(json.dumps({"sites": sites}))
    return path


def _signed(key: ec.EllipticCurvePrivateKey, at: datetime | None = None, signed: str | None = None) -> dict[str, str]:
    """Flower's node authentication headers (as its SuperNode's interceptor makes them): the key, a timestamp,
    the key's signature of ``signed`` (the timestamp itself unless a test forges another)."""
    timestamp = (at or datetime.now(timezone.utc)).isoformat()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signature = key.sign((signed or timestamp).encode("ascii"), ec.ECDSA(hashes.SHA256()))
    return {"flwr-public-key": base64.b64encode(pem).decode(), "flwr-timestamp": timestamp,
            "flwr-signature": base64.b64encode(signature).decode()}


def _post(port: int, path: str, body: bytes, signature: str = "signed", timeout: float = 30, key: str | None = None,
          signed_by: ec.EllipticCurvePrivateKey | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    auth = _signed(signed_by) if signed_by is not None else {"flwr-signature": signature,
                                                             "flwr-timestamp": "2026-12-03T15:00:00",
                                                             **({"flwr-public-key": key} if key else {})}
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/protobuf", **auth})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.slow(seconds=9)  # mostly waiting on the relay process: handed out early, beside busy tests
def test_the_relay_process_holds_a_pull_and_passes_the_site_request_unchanged(relay):
    port, upstream = relay(messages_after=4)
    request = PullMessagesRequest(node=Node(node_id=42)).SerializeToString()
    status, body = _post(port, PULL, request)
    assert (status, body) == (200, A_MESSAGE)  # one request of the site, five asks of the SuperLink
    assert len(upstream.asks) == 5
    assert set(upstream.asks) == {(PULL, request, "signed", "2026-12-03T15:00:00")}  # the site's own, each time


def test_the_relay_process_passes_refusals_at_once_and_only_its_four_routes(relay, tmp_path):
    port, upstream = relay(messages_after=100)
    request = PullMessagesRequest(node=Node(node_id=42)).SerializeToString()
    assert _post(port, PULL, request, signature="forged")[0] == 401  # the SuperLink's verdict, not held
    assert len(upstream.asks) == 1
    for path in ("/v1/control/list-runs", "/v1/fleet/send-node-heartbeat", "/v1/runtime/acquire-task", "/v1/fleet/"):
        assert _post(port, path, b"")[0] == 404, path
    assert len(upstream.asks) == 1  # none of them reached the stand-in
    assert _post(port, PULL, b"x" * (65 * 1024))[0] == 413


@pytest.mark.slow(seconds=9)  # mostly waiting on the relay process: handed out early, beside busy tests
def test_the_relay_process_stops_asking_when_the_site_hangs_up(relay):
    port, upstream = relay(messages_after=10_000, hold_s=20)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        request = PullMessagesRequest(node=Node(node_id=42)).SerializeToString()
        raw.sendall(f"POST {PULL} HTTP/1.1\r\nHost: x\r\nflwr-signature: signed\r\nContent-Length: {len(request)}"
                    f"\r\n\r\n".encode() + request)
        deadline = time.monotonic() + 10
        while len(upstream.asks) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(upstream.asks) >= 3  # held: asked again and again
    # the site hung up: the relay checks before every ask, and asks no more
    time.sleep(1.5)
    settled = len(upstream.asks)
    time.sleep(2.0)
    assert len(upstream.asks) == settled


@pytest.mark.slow(seconds=9)  # mostly waiting on the relay process: handed out early, beside busy tests
def test_a_sites_newer_pull_ends_its_older_one_and_naming_its_key_does_not(relay):
    """One held pull per site key: otherwise one registered key could keep hundreds held, each asked about
    again and again. A pull counts only once the SuperLink accepted its signature, so a stranger who names a
    site's public key cannot end that site's hold."""
    port, upstream = relay(messages_after=10_000, hold_s=20)
    site_a, site_b = "c2l0ZS1h", "c2l0ZS1i"  # base64, as Flower sends a site's public key
    request = PullMessagesRequest(node=Node(node_id=42)).SerializeToString()
    answers: dict[str, tuple[int, bytes]] = {}

    def pull(name: str, key: str) -> threading.Thread:
        thread = threading.Thread(target=lambda: answers.__setitem__(name, _post(port, PULL, request, key=key)),
                                  daemon=True)
        thread.start()
        return thread

    older = pull("older", site_a)
    deadline = time.monotonic() + 10
    while len(upstream.asks) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _post(port, PULL, request, signature="forged", key=site_a)[0] == 401  # refused at once
    other = pull("other", site_b)  # another site's pull is its own
    older.join(timeout=3)
    assert older.is_alive()  # still held: the stranger's pull never counted
    newer = pull("newer", site_a)
    older.join(timeout=10)
    assert not older.is_alive() and answers["older"] == (200, EMPTY)  # ended with "nothing yet"
    assert newer.is_alive() and other.is_alive()
    # the key, not the header's text: "AQI=", "AQJ=" and "AQI=\t" are the same two bytes (base64's unused bits,
    # blanks the SuperLink strips)
    asked = len(upstream.asks)
    first = pull("first", "AQI=")
    deadline = time.monotonic() + 10
    while len(upstream.asks) == asked and time.monotonic() < deadline:  # held (claimed right after its first ask)
        time.sleep(0.05)
    time.sleep(0.2)
    second = pull("second", "AQJ=")
    first.join(timeout=10)
    assert not first.is_alive() and answers["first"] == (200, EMPTY) and second.is_alive()
    third = pull("third", "AQI=\t")
    second.join(timeout=10)
    assert not second.is_alive() and answers["second"] == (200, EMPTY) and third.is_alive()
    # a key header that is not base64 cannot be told apart from others: asked once, not held
    assert _post(port, PULL, request, key="not base64!") == (200, EMPTY) and upstream.keys.count("not base64!") == 1


def test_the_relay_process_delivers_an_announced_message_at_once_and_asks_little_meanwhile(relay, tmp_path):
    port, upstream = relay(messages_after=10_000, hold_s=30, first_message=True)
    link = RelayLink(tmp_path / "pull_relay.wake")
    request = PullMessagesRequest(node=Node(node_id=42)).SerializeToString()
    assert link.announce()  # an exchange: the ServerApp announces its messages...
    assert _post(port, PULL, request) == (200, A_MESSAGE)  # ...and the site gets its own (the route is in use)
    result = {}
    site = threading.Thread(target=lambda: result.update(answer=_post(port, PULL, request)), daemon=True)
    site.start()  # the site's next pull: the server is still waiting for the other sites
    deadline = time.monotonic() + 10
    while len(upstream.asks) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.6)  # a route in use without announcements asks after 0.1 s, 0.1 s, ... (quarter steps)
    assert len(upstream.asks) == 2  # announced: the next ask is ANNOUNCED_STEP_S after this one
    upstream.messages_after = 2  # the ServerApp pushes the site's next message...
    assert link.announce()  # ...and announces it: the held pull asks at once
    site.join(timeout=30)
    assert result.get("answer") == (200, A_MESSAGE) and len(upstream.asks) == 3
    assert upstream.asked_at[2] - upstream.asked_at[1] < ANNOUNCED_STEP_S  # woken, not the step's end
    link.close()


def test_the_relay_passes_pushes_on_unchanged_and_tells_the_serverapp_when_the_replies_are_complete(relay, tmp_path):
    port, upstream = relay(messages_after=0)
    link = RelayLink(tmp_path / "pull_relay.wake")
    assert link.announce()  # the ServerApp pushed a stage's messages; the relay now knows where it listens
    push = b"a site's reply: message and object tree"
    status, body = _post(port, PUSH_MESSAGES, push, signed_by=SITE_KEY)
    assert (status, body) == (200, _pushed_messages(["o1", "o2"], "session-1"))  # the SuperLink's answer, as is
    assert not link.wait_for_replies(0.5)  # listed to the ServerApp, but its two objects are still to come
    first = _pushed_object("o1", "session-1")
    assert _post(port, PUSH_OBJECT, first, signed_by=SITE_KEY)[0] == 200
    assert not link.wait_for_replies(0.5)
    big = PushObjectRequest(object_id="o2", session_id="session-1", object_content=b"\x01" * 3_000_000)
    assert _post(port, PUSH_OBJECT, big.SerializeToString(), signed_by=SITE_KEY)[0] == 200  # an array chunk
    assert link.wait_for_replies(10)  # complete: the ServerApp pulls it now, every object there
    stranger = ec.generate_private_key(ec.SECP384R1())
    assert _post(port, PUSH_MESSAGES, push, signed_by=stranger)[0] == 401  # a stranger's push: refused by the relay...
    assert _post(port, PUSH_MESSAGES, push, signature="forged")[0] == 401  # ...and one with no key at all
    assert not link.wait_for_replies(0.5)  # ...and it completes nothing
    assert [(path, body) for path, body, *_ in upstream.asks] == [  # the strangers' pushes never reached it
        (PUSH_MESSAGES, push), (PUSH_OBJECT, first), (PUSH_OBJECT, big.SerializeToString())]
    public = base64.b64encode(SITE_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    assert upstream.keys == [public] * 3  # the site's own headers, passed on as sent
    assert len(set(upstream.peers)) == 1  # pushes seconds apart share one warm connection to the SuperLink
    link.close()


def test_the_push_gate_lets_only_a_registered_key_with_a_fresh_signature_through(tmp_path):
    """The SuperLink's own node authentication, checked before a push's body is read: 401 for anyone else, as
    the SuperLink would answer; 503 (which a SuperNode retries, where a 401 stops it) while the registry
    cannot be read."""
    other = ec.generate_private_key(ec.SECP384R1())
    registry = _registry(tmp_path / "sites.json", SITE_KEY)
    gate = PushGate(registry)
    line = public_key_line(SITE_KEY.public_key())
    assert gate.site(_signed(SITE_KEY)) == line
    assert gate.site(_signed(other)) == 401  # a valid signature, but not a consortium member's key
    assert gate.site(_signed(SITE_KEY, at=datetime.now(timezone.utc) - timedelta(minutes=6))) == 401  # stale
    assert gate.site(_signed(SITE_KEY, at=datetime.now(timezone.utc) + timedelta(minutes=1))) == 401  # future
    assert gate.site(_signed(SITE_KEY, signed="2026-12-03T15:00:00+00:00")) == 401  # signed another timestamp
    assert gate.site({**_signed(SITE_KEY), "flwr-signature": "bm90IGEgc2lnbmF0dXJl"}) == 401
    assert gate.site({"flwr-public-key": "%%%", "flwr-timestamp": "x", "flwr-signature": ""}) == 401
    assert gate.site({}) == 401
    # the consortium removed the site and added another (written as the registry writes it: a new file)
    _registry(tmp_path / "next.json", other).replace(registry)
    assert gate.site(_signed(SITE_KEY)) == 401 and gate.site(_signed(other)) == public_key_line(other.public_key())
    registry.write_text('{"sites": 5}')  # broken by hand
    assert gate.site(_signed(other)) == 503
    registry.unlink()
    assert gate.site(_signed(other)) == 503


def test_the_push_gate_reads_a_few_pushes_of_one_site_at_once_and_lets_a_few_more_wait():
    gate = PushGate(Path("unused"), per_site=2, waiting_per_site=1)
    assert gate.take("a", 0) and gate.take("a", 0)
    assert not gate.take("a", 0) and gate.take("b", 0)  # a's third does not get in; b has its own
    taken = []
    blocked = threading.Thread(target=lambda: taken.append(gate.take("a", 60)), daemon=True)  # a's one waiter
    blocked.start()
    try:
        deadline = time.monotonic() + 10
        while gate.waiting("a") != 1:
            assert time.monotonic() < deadline and blocked.is_alive(), "the waiter never waited"
            time.sleep(0.01)
        # a further one is refused at once: had it waited its 60 s, the waiter's 60 s would have run out too
        assert not gate.take("a", 60)
        assert blocked.is_alive() and taken == []
    finally:
        gate.give_back("a")  # one of a's two is read: the waiter's turn (and nothing waits on after a failure)
        blocked.join(10)
    assert taken == [True]


@pytest.mark.slow(seconds=9)  # mostly waiting on the relay process: handed out early, beside busy tests
def test_a_strangers_push_is_refused_before_its_body_is_read_and_a_site_has_few_read_at_once(relay):
    """Anyone who reaches the proxy can start a push, and the SuperLink checks its signature only once the relay
    passes it on. Without the gate, pushes declaring the largest size (64 MB here), sent slowly, would fill
    the server host's memory, or, under one cap for all, hold every site's pushes back."""
    port, upstream = relay(messages_after=0)
    stranger = ec.generate_private_key(ec.SECP384R1())

    def start_push(key: ec.EllipticCurvePrivateKey) -> socket.socket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        headers = "".join(f"{name}: {value}\r\n" for name, value in _signed(key).items())
        raw.sendall(f"POST {PUSH_OBJECT} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {64 * 1024 * 1024}"
                    "\r\n\r\n".encode() + b"x" * 1000)
        return raw

    refused = start_push(stranger)
    try:
        assert refused.recv(4096).startswith(b"HTTP/1.1 401")  # at once, with 64 MB still to come
    finally:
        refused.close()
    slow = [start_push(SITE_KEY) for _ in range(PUSHES_PER_SITE)]  # the site's own pushes, stalled
    try:
        time.sleep(2)  # the relay reads their headers (milliseconds) and starts reading their bodies
        answers = []
        pusher = threading.Thread(target=lambda: answers.append(
            _post(port, PUSH_OBJECT, _pushed_object("o1", "s"), signed_by=SITE_KEY)))
        pusher.start()
        pusher.join(3)
        assert pusher.is_alive() and upstream.asks == []  # its third waits, unread
        # another site's push is not held back by the first site's
        assert _post(port, PUSH_OBJECT, _pushed_object("o2", "t"), signed_by=OTHER_SITE_KEY)[0] == 200
        slow.pop(0).close()  # one stalled push hangs up
        pusher.join(30)
        assert answers and answers[0][0] == 200
        assert [body for _, body, *_ in upstream.asks] == [_pushed_object("o2", "t"), _pushed_object("o1", "s")]
    finally:
        for raw in slow:
            raw.close()


def test_a_repeated_authentication_header_is_refused_not_passed_on(relay):
    """The gate reads the first of a repeated header, the relay would pass on the last: a registered site's
    headers first and another key's after them would let that key's push through unchecked."""
    port, upstream = relay(messages_after=0)
    other = ec.generate_private_key(ec.SECP384R1())  # a node the SuperLink may know, the registry not
    for path in (PUSH_OBJECT, PULL):
        for repeated in (_signed(other), {"flwr-public-key": _signed(other)["flwr-public-key"]}):
            lines = [*_signed(SITE_KEY).items(), *repeated.items()]
            body = _pushed_object("o1", "s")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                headers = "".join(f"{name}: {value}\r\n" for name, value in lines)
                raw.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {len(body)}\r\n\r\n"
                            .encode() + body)
                assert raw.recv(4096).startswith(b"HTTP/1.1 400"), (path, list(repeated))
    assert upstream.asks == []  # none of them reached the SuperLink
    assert _post(port, PUSH_OBJECT, _pushed_object("o1", "s"), signed_by=SITE_KEY)[0] == 200  # once each: passed


def test_a_reply_pushed_in_another_sites_name_is_refused_not_passed_on(relay):
    """Flower's SuperLink ties a push's node id to its signing key, and a reply to the message it answers by the
    reply's own sender id, never the two together: a registered site that guessed another's message id could
    answer for it. The relay refuses replies whose sender is not the pushing node."""
    from flwr.proto.fleet_pb2 import PushMessagesRequest  # pylint: disable=no-name-in-module
    from flwr.proto.message_pb2 import (
        Message as MessageProto,  # pylint: disable=no-name-in-module
        Metadata,  # pylint: disable=no-name-in-module
    )
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module

    def push(pusher: int, *senders: int) -> bytes:
        replies = [MessageProto(metadata=Metadata(src_node_id=sender, dst_node_id=1, reply_to_message_id="m"))
                   for sender in senders]
        return PushMessagesRequest(node=Node(node_id=pusher), messages_list=replies).SerializeToString()

    port, upstream = relay(messages_after=0)
    for forged in (push(7, 8), push(7, 7, 8)):  # site 7 answering as site 8, alone or beside its own reply
        status, body = _post(port, PUSH_MESSAGES, forged, signed_by=SITE_KEY)
        assert status == 403 and b"sender must be the node that pushes it" in body
    assert upstream.asks == []  # none reached the SuperLink
    assert _post(port, PUSH_MESSAGES, push(7, 7), signed_by=SITE_KEY)[0] == 200  # its own reply passes
    assert [body for _, body, *_ in upstream.asks] == [push(7, 7)]


@pytest.mark.slow(seconds=8)  # mostly waiting out the relay's 5 s object hold
def test_a_site_gets_at_most_two_object_pulls_held_however_many_it_opens(relay):
    """A site can name objects in its reply that it never sends; each pull of one is "not yet" for good, and a
    held pull asks the SuperLink every 0.05 s for 5 s. Held without a limit, 20 such pulls would be some
    2,000 asks, each an authenticated request to the SuperLink."""
    port, upstream = relay(messages_after=0)
    answers = []

    def pull(index: int) -> None:
        request = PullObjectRequest(node=Node(node_id=42), run_id=1, object_id=f"never-sent-{index}")
        answers.append(_post(port, PULL_OBJECT, request.SerializeToString(), signed_by=SITE_KEY))

    pulls = [threading.Thread(target=pull, args=(index,), daemon=True) for index in range(20)]
    for thread in pulls:
        thread.start()
    for thread in pulls:
        thread.join(60)
    not_yet = PullObjectResponse(object_found=True, object_available=False).SerializeToString()
    assert answers == [(200, not_yet)] * 20  # each site request answered "not yet", as the SuperLink says
    asked = [PullObjectRequest.FromString(body).object_id for path, body, *_ in upstream.asks if path == PULL_OBJECT]
    assert len(set(asked)) == 20
    # Once every pull has been asked about, only the site's two newest are asked about again: each of the
    # others ends at its next look (at most one ask in flight), whenever the 20 arrived.
    last_first = max(asked.index(object_id) for object_id in set(asked))
    after = Counter(asked[last_first + 1:])
    held = sorted(object_id for object_id, count in after.items() if count > 10)
    assert len(held) == 2, after  # about 100 asks each over the 5 s hold
    assert all(count <= 1 for object_id, count in after.items() if object_id not in held), after


def test_relay_log_names_the_upstream(relay, tmp_path):
    relay(messages_after=0)
    deadline = time.monotonic() + 30
    log = Path(tmp_path / "relay.log")
    while "pull relay on 127.0.0.1:" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "empty pulls held up to 10 s, announcements on udp 127.0.0.1:" in log.read_text()
