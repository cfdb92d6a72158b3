"""The pull relay (server/pull_relay.py): what it holds, for how long, what it passes on at once,
and that it never asks on behalf of a site that has left.

The relay runs as its own process here (the command `fedpath-server start` runs) in front of a
stand-in for the SuperLink that answers with Flower's own protobuf messages and counts what it is
asked. Through real Flower processes: tests/test_site_runner.py (every pull of a SecAgg+ run goes
through the relay) and benchmarks/round_overhead.py.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse, Reconnect
from flwr.proto.message_pb2 import Message, PullObjectResponse
from flwr.proto.node_pb2 import Node

from server.pull_relay import (
    ACTIVE_S,
    HELD_ROUTES,
    IDLE_STEP_S,
    OBJECT_HOLD_S,
    Answer,
    Wakeup,
    bind_listener,
    hold,
    message_step,
    no_message,
    object_not_ready,
    relay_command,
)
from shared.processes import stop_pid

EMPTY = PullMessagesResponse().SerializeToString()
A_MESSAGE = PullMessagesResponse(messages_list=[Message()]).SerializeToString()
PULL = "/v1/fleet/pull-messages"


def _answer(body: bytes, status: int = 200) -> Answer:
    return Answer(status, "OK", [("Content-Type", "application/protobuf")], body)


class _Clock:
    """Time that moves only when the relay waits; the route counts as in use unless ``idle``."""

    def __init__(self, idle: bool = False) -> None:
        self.now = 0.0
        self.waits: list[float] = []
        self.idle = idle

    def __call__(self) -> float:
        return self.now

    def wait(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    def wake(self, now: float) -> None:
        pass

    def active(self, now: float) -> bool:
        return not self.idle


def _hold(answers: list[bytes], hold_s: float = 10.0, route: str = PULL, still_wanted=lambda: True,
          idle: bool = False):
    clock, asked = _Clock(idle), []

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
    answer, asked, waits = _hold([not_yet] * 3 + [ready], route="/v1/fleet/pull-object")
    assert answer.body == ready and len(asked) == 4 and waits == [0.05] * 3
    answer, asked, waits = _hold([not_yet], hold_s=10.0, route="/v1/fleet/pull-object")
    assert sum(waits) <= OBJECT_HOLD_S and answer.body == not_yet  # held 5 s at most, whatever hold_s says


def test_a_message_for_one_site_wakes_every_held_site():
    """The server sends a round's messages to all sites together: the first held pull that finds
    its message makes the others ask at once instead of after their step."""
    wakeup = Wakeup()
    woke = threading.Event()
    waiter = threading.Thread(target=lambda: (wakeup.wait(60), woke.set()), daemon=True)
    waiter.start()
    time.sleep(0.2)
    answer = hold(lambda: _answer(A_MESSAGE), HELD_ROUTES[PULL], 10.0, lambda: True, wakeup=wakeup)
    assert answer.body == A_MESSAGE
    assert woke.wait(10), "the held request was not woken"


# --- the relay process -------------------------------------------------------------------------------


class _StandIn(http.server.ThreadingHTTPServer):
    """Answers pull-messages with "no message" until ``messages_after`` asks, then with one."""

    daemon_threads = True

    def __init__(self, messages_after: int) -> None:
        super().__init__(("127.0.0.1", 0), _StandInHandler)
        self.messages_after, self.asks = messages_after, []


class _StandInHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _StandIn

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        headers = self.headers
        self.server.asks.append((self.path, body, headers.get("flwr-signature"), headers.get("flwr-timestamp")))
        if self.headers.get("flwr-signature") != "signed":
            self.send_response(401)
            payload = b""
        else:
            self.send_response(200)
            payload = A_MESSAGE if len(self.server.asks) > self.server.messages_after else EMPTY
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

    def launch(messages_after: int, hold_s: float = 10.0):
        upstream = _StandIn(messages_after)
        threading.Thread(target=upstream.serve_forever, daemon=True).start()
        listener = bind_listener("127.0.0.1")
        with listener, (tmp_path / "relay.log").open("ab") as log:
            process = subprocess.Popen(relay_command(listener, upstream.server_address, None, hold_s),
                                       stdout=log, stderr=subprocess.STDOUT, pass_fds=(listener.fileno(),),
                                       start_new_session=True)
            port = listener.getsockname()[1]
        started.append((process, upstream))
        return port, upstream

    yield launch
    for process, upstream in started:
        stop_pid(process.pid)
        upstream.shutdown()
        upstream.server_close()


def _post(port: int, path: str, body: bytes, signature: str = "signed", timeout: float = 30):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/protobuf",
                                                               "flwr-signature": signature,
                                                               "flwr-timestamp": "2026-12-03T15:00:00"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_the_relay_process_holds_a_pull_and_passes_the_site_request_unchanged(relay):
    port, upstream = relay(messages_after=4)
    request = PullMessagesRequest(node=Node(node_id=42)).SerializeToString()
    status, body = _post(port, PULL, request)
    assert (status, body) == (200, A_MESSAGE)  # one request of the site, five asks of the SuperLink
    assert len(upstream.asks) == 5
    assert set(upstream.asks) == {(PULL, request, "signed", "2026-12-03T15:00:00")}  # the site's own, each time


def test_the_relay_process_passes_refusals_at_once_and_only_two_routes(relay, tmp_path):
    port, upstream = relay(messages_after=100)
    request = PullMessagesRequest(node=Node(node_id=42)).SerializeToString()
    assert _post(port, PULL, request, signature="forged")[0] == 401  # the SuperLink's verdict, not held
    assert len(upstream.asks) == 1
    for path in ("/v1/control/list-runs", "/v1/fleet/push-object", "/v1/runtime/acquire-task", "/v1/fleet/"):
        assert _post(port, path, b"")[0] == 404, path
    assert len(upstream.asks) == 1  # none of them reached the stand-in
    assert _post(port, PULL, b"x" * (65 * 1024))[0] == 413


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


def test_relay_log_names_the_upstream(relay, tmp_path):
    relay(messages_after=0)
    deadline = time.monotonic() + 30
    log = Path(tmp_path / "relay.log")
    while "pull relay on 127.0.0.1:" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "empty pulls held up to 10 s" in log.read_text()
