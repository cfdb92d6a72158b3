"""Hold a site's pull while the SuperLink's answer is "not yet" (long polling), for a few seconds.

Why: a Flower 1.42 SuperNode asks the SuperLink for a message and, when there is none, sleeps a
fixed 3 s before asking again (``flwr/supernode/start_client_internal.py``; no setting changes it).
In a federated round every site asks right after sending its reply, finds nothing because the
server is still waiting for the other sites, and sleeps: the next message then waited for the end
of that sleep, about 2.5 s at every exchange (one per plain round, five in a SecAgg+ round;
docs/benchmarks.md, "Where a round's time goes"). Likewise a message is announced before the
ServerApp has pushed its arrays, and a SuperNode that asks for an array too early backs off 1 s.

The relay sits behind nginx on loopback and serves only the two pulls in ``HELD_ROUTES`` and the
two pushes in ``PASSED_ROUTES`` (the proxy sends every other Fleet route straight to the SuperLink).
It passes the site's request on unchanged and, while the SuperLink answers "not yet", asks
again: for a message after a quarter of the time already waited (0.1-0.5 s), until ``hold_s`` has
passed, then it gives the site the empty answer; for an array every 0.05 s, up to 5 s. When one held
pull gets its message, every held pull asks again at once: the server sends a round's messages to
all sites together. Each ask costs the SuperLink about 10 ms of CPU, so when no message was
delivered for a minute (no run) it asks every 2 s: about what the SuperNodes' own 3 s polling costs.

The ServerApp announces its messages (``server/relay_signals.py``): right after pushing them it
sends one datagram to the relay's wake port, and every held pull asks again at once. While
announcements come (one in the last minute), a held pull asks only every 2 s besides. The relay also
passes the sites' two push routes on, once each and unchanged (``PASSED_ROUTES``), to tell the
ServerApp when no reply is still arriving, so that it never pulls a reply whose arrays are not all
there yet. A push is read whole before it is passed on (its session and object ids come after the
array in Flower's message), so the relay holds up to ``superlink.max_request_mb`` per push in flight;
nginx refuses anything larger from its Content-Length alone. Since the SuperLink checks a push's
signature only once the relay passes it on, the relay first checks Flower's node authentication
headers itself (``server/push_gate.py``): a key of the consortium registry, a fresh timestamp, its signature.
Anyone else's push is refused (401) before its body is read, and a registered site has at most
``PUSHES_PER_SITE`` bodies read at once. Otherwise anyone who reaches the proxy could fill the
server host's memory with pushes of the largest size, or, with a cap for all, hold every site's
pushes back with four slow ones.

A site holds one pull for messages at a time: its newer pull ends the older one, which gets the empty
answer at its next look (within ``IDLE_STEP_S``), as a hold that ran out. Flower's SuperNode pulls one
at a time anyway; without this, one registered key could keep hundreds of pulls held, each asked about
again and again, and load the SuperLink with ten times the work of the requests themselves. A pull
counts as the site's only once the SuperLink has answered it "nothing yet", i.e. accepted its
signature: someone who merely names a site's public key cannot end that site's hold.

It may do only what the site's own request says: the same signed headers (Flower's node
authentication signs a timestamp the SuperLink accepts for 5 minutes) and the same body, checked
by the SuperLink at every ask. Any other answer (a refusal, an error) is passed on at once. The
relay holds no key and stores nothing. Before asking again it checks the site is still connected,
so nothing is taken from the SuperLink for a site that gave up. Run as ``python -m
server.pull_relay`` by `fedpath-server start`, on a socket the start command bound
(``--listen-fd``), so no port is chosen twice.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import http.server
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flwr.proto.fleet_pb2 import PullMessagesResponse, PushMessagesResponse  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import (  # pylint: disable=no-name-in-module
    PullObjectResponse,
    PushObjectRequest,
    PushObjectResponse,
)
from google.protobuf.message import DecodeError

from server.push_gate import FLEET_KEY_HEADER, SIGNED_HEADERS, PushGate, foreign_sender, key_bytes
from server.relay_signals import Announcements, PushTracker, read_wake_file
from shared.polling import quarter_step

MAX_BODY = 64 * 1024  # a pull request is a node id and a few message or object ids
UPSTREAM_TIMEOUT_S = 30.0
PUSH_TIMEOUT_S = 300.0  # as nginx allows a push: the SuperLink may take long to store a large array
DISCARD_BYTES, DISCARD_S = 16 * 1024 * 1024, 5.0  # of a refused push's body, read into nothing before answering
OBJECT_HOLD_S = 5.0  # an announced object is normally pushed within a second
OBJECT_HOLDS_PER_SITE = 2  # held object pulls of one site at once (Flower's SuperNode pulls two at a time)
ACTIVE_S = 60.0  # a route that delivered something this recently is in use: ask often
IDLE_STEP_S = 2.0  # otherwise (no run, or between runs): each ask costs the SuperLink ~10 ms of CPU
ANNOUNCED_STEP_S = 2.0  # while the ServerApp announces its messages: a fallback, should one be lost
# Per connection, not end to end: never passed on (RFC 9110 7.6.1); Date and Server are the relay's own.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "content-length", "date", "server", "host"})


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


def _decoded(answer: Answer, response_class):
    """The SuperLink's protobuf answer, or None for anything to pass on as it is (an error, a
    compressed or unreadable body)."""
    if answer.status != 200 or any(name.lower() == "content-encoding" for name, _ in answer.headers):
        return None
    return _parsed(response_class, answer.body)


def _parsed(message_class, body: bytes):
    try:
        return message_class.FromString(body)
    except DecodeError:
        return None


def no_message(answer: Answer) -> bool:
    """The SuperLink has no message for this site yet."""
    response = _decoded(answer, PullMessagesResponse)
    return response is not None and not response.messages_list and not response.HasField("reconnect")


def object_not_ready(answer: Answer) -> bool:
    """The object is announced (its message was pushed) but its content has not arrived yet."""
    response = _decoded(answer, PullObjectResponse)
    return response is not None and response.object_found and not response.object_available


def message_step(waited_s: float) -> float:
    """Ask again after a quarter of the time already waited (0.1-0.5 s): a message that comes late
    reaches the site late by at most a quarter of its wait."""
    return quarter_step(waited_s, 0.1, 0.5)


def object_step(waited_s: float) -> float:
    return 0.05


def site_of(header: str) -> str | None:
    """The site a pull is signed for: its public key as bytes (``key_bytes``), hashed; None if there is none."""
    key = key_bytes(header)
    return None if key is None else hashlib.sha256(key).hexdigest()


class Holders:
    """Which held requests of a route are each site's current ones (by the public key its request is signed
    with): the ``per_site`` newest. A newer one ends the oldest, which then asks no more; so one key cannot
    keep hundreds held, each asked about every step, whatever it opens."""

    def __init__(self, per_site: int = 1) -> None:
        self.per_site = per_site
        self._lock = threading.Lock()
        self._current: dict[str, list[object]] = {}

    def claim(self, site: str) -> object:
        """This request is now one of the site's current ones; its oldest beyond ``per_site`` is not any more."""
        token = object()
        with self._lock:
            current = self._current.setdefault(site, [])
            current.append(token)
            del current[:-self.per_site]
        return token

    def is_current(self, site: str, token: object) -> bool:
        with self._lock:
            return token in self._current.get(site, ())

    def release(self, site: str, token: object) -> None:
        with self._lock:
            current = self._current.get(site, [])
            if token in current:
                current.remove(token)
            if not current:
                self._current.pop(site, None)


@dataclass(frozen=True)
class HeldRoute:
    """A Fleet pull whose "not yet" answer the relay keeps asking about instead of passing on.

    Args:
        not_yet: True for an answer that means "ask again later".
        step: seconds to the next ask, given the seconds waited so far.
        longest_s: the longest hold on this route (the configured hold caps it).
        wakes_others: an answer with content makes every held request on this route ask again at
            once (the server sends a round's messages to all sites together).
        idle_step_s: the step instead of ``step`` while the route has delivered nothing for
            ``ACTIVE_S`` (None: always ``step``).
        announced_step_s: the step while the ServerApp announces its pushes (one came within
            ``ACTIVE_S``; ``server/relay_signals.py``), a fallback should one be lost (None:
            announcements only wake).
        held_per_site: at most this many requests of one site are held; a newer one ends its oldest
            (``Holders``; None: no limit).
    """

    not_yet: Callable[[Answer], bool]
    step: Callable[[float], float]
    longest_s: float = float("inf")
    wakes_others: bool = False
    idle_step_s: float | None = None
    announced_step_s: float | None = None
    held_per_site: int | None = None


MESSAGES = "/v1/fleet/pull-messages"
HELD_ROUTES = {
    # Flower's SuperNode sleeps 3 s after an empty pull.
    MESSAGES: HeldRoute(no_message, message_step, wakes_others=True, idle_step_s=IDLE_STEP_S,
                        announced_step_s=ANNOUNCED_STEP_S, held_per_site=1),
    # A message is announced before the ServerApp has pushed its arrays; a SuperNode that asks too
    # early backs off 1 s, then 2 s (flwr/supercore/inflatable/inflatable_utils.py: pull_objects).
    # Flower's SuperNode pulls two objects at once (FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS); a site that opens
    # more, for objects its own reply named and never sent, gets no more than two asked about every 0.05 s.
    "/v1/fleet/pull-object": HeldRoute(object_not_ready, object_step, longest_s=OBJECT_HOLD_S,
                                       held_per_site=OBJECT_HOLDS_PER_SITE),
}


PUSH_MESSAGES, PUSH_OBJECT = "/v1/fleet/push-messages", "/v1/fleet/push-object"
PASSED_ROUTES = (PUSH_MESSAGES, PUSH_OBJECT)
"""Passed on once and unchanged; the relay only notes which replies are still arriving."""


class Wakeup:
    """Held requests of one route wait here. ``wake`` makes all of them ask again at once: after a
    delivery (the server sends a round's messages together; the route counts as in use for
    ``ACTIVE_S``) or an announcement (``announced``: the ServerApp has just pushed messages)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._generation = 0
        self._delivered_at = float("-inf")
        self._announced_at = float("-inf")

    @property
    def generation(self) -> int:
        """Changes at every wake; taken before an ask, so a wake during the ask is not slept through."""
        with self._condition:
            return self._generation

    def wait(self, seconds: float, since: int) -> None:
        """Return after ``seconds``, or at once if a wake came after ``generation`` was ``since``."""
        with self._condition:
            self._condition.wait_for(lambda: self._generation != since, timeout=seconds)

    def wake(self, now: float, announced: bool = False) -> None:
        with self._condition:
            self._generation += 1
            if announced:
                self._announced_at = now
            else:
                self._delivered_at = now
            self._condition.notify_all()

    def active(self, now: float) -> bool:
        return now - max(self._delivered_at, self._announced_at) < ACTIVE_S

    def announcing(self, now: float) -> bool:
        return now - self._announced_at < ACTIVE_S


def hold(ask: Callable[[], Answer], route: HeldRoute, hold_s: float, still_wanted: Callable[[], bool],
         wakeup: Wakeup | None = None, clock: Callable[[], float] = time.monotonic) -> Answer:
    """Ask until the answer is not "not yet", the site has gone, or the hold is over; the last answer.

    Args:
        ask: sends the site's request to the SuperLink once and returns its answer.
        route: what "not yet" is on this route and how often to ask.
        hold_s: longest time to keep the site waiting (0: ask once).
        still_wanted: False once the site has closed its connection (then nothing more is asked,
            so nothing is taken from the SuperLink for a site that will not read it).
        wakeup: the route's shared state: where to wait between asks, whether it is in use (a new
            one: nobody wakes this request early and the route counts as idle).
    """
    wakeup = wakeup or Wakeup()
    longest = min(hold_s, route.longest_s)
    start = clock()
    seen = wakeup.generation
    answer = ask()
    while route.not_yet(answer):
        now = clock()
        waited = now - start
        if route.announced_step_s is not None and wakeup.announcing(now):
            step = route.announced_step_s
        elif route.idle_step_s is not None and not wakeup.active(now):
            step = route.idle_step_s
        else:
            step = route.step(waited)
        if waited >= longest:
            return answer
        wakeup.wait(min(step, longest - waited), seen)  # the last wait ends with the hold, then one more ask
        if not still_wanted():
            return answer
        seen = wakeup.generation
        answer = ask()
    if route.wakes_others:
        wakeup.wake(clock())
    return answer


@dataclass(frozen=True)
class Upstream:
    """The SuperLink on loopback: its address, and with TLS the CA and the name its certificate must carry."""

    host: str
    port: int
    context: ssl.SSLContext | None = None
    tls_name: str | None = None

    def connect(self, timeout: float = UPSTREAM_TIMEOUT_S) -> _Connection:
        return _Connection(self, timeout)


class WarmConnections:
    """Connections to the SuperLink kept open between the pushes of an exchange.

    Why: a push is one request, and a new TLS connection for each one (four per site per exchange)
    cost about 0.1 s of an exchange here. A connection is reused only if its last answer came less
    than ``fresh_s`` ago, well inside the SuperLink's keep-alive (uvicorn closes an idle connection
    after 5 s), so a push is never sent on a connection the SuperLink may have closed, and never
    sent twice.
    """

    def __init__(self, upstream: Upstream, timeout: float, fresh_s: float = 2.0, keep: int = 8) -> None:
        self.upstream, self.timeout, self.fresh_s, self.keep = upstream, timeout, fresh_s, keep
        self._lock = threading.Lock()
        self._idle: list[tuple[_Connection, float]] = []

    def take(self) -> _Connection:
        now = time.monotonic()
        with self._lock:
            stale = [c for c, at in self._idle if now - at >= self.fresh_s]
            fresh = [(c, at) for c, at in self._idle if now - at < self.fresh_s]
            taken = fresh.pop()[0] if fresh else None
            self._idle = fresh
        for connection in stale:
            connection.close()
        return taken if taken is not None else self.upstream.connect(self.timeout)

    def give_back(self, connection: _Connection, reusable: bool) -> None:
        """``reusable``: the answer was read whole and the SuperLink keeps the connection open."""
        if reusable:
            with self._lock:
                if len(self._idle) < self.keep:
                    self._idle.append((connection, time.monotonic()))
                    return
        connection.close()


class _Connection(http.client.HTTPConnection):
    def __init__(self, upstream: Upstream, timeout: float) -> None:
        super().__init__(upstream.host, upstream.port, timeout=timeout)
        self._upstream = upstream

    def connect(self) -> None:
        super().connect()
        if self._upstream.context is not None:
            self.sock = self._upstream.context.wrap_socket(self.sock, server_hostname=self._upstream.tls_name)


class RelayServer(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a held request never delays the relay's own exit

    def __init__(self, listening: socket.socket, upstream: Upstream, hold_s: float, max_push_bytes: int,
                 registry: Path | None) -> None:
        super().__init__(listening.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listening
        self.upstream, self.hold_s, self.max_push_bytes = upstream, hold_s, max_push_bytes
        self.push_gate = None if registry is None else PushGate(registry)
        self.wakeups = {path: Wakeup() for path in HELD_ROUTES}
        self.holders = {path: Holders(route.held_per_site) for path, route in HELD_ROUTES.items()
                        if route.held_per_site}
        self.pushes = PushTracker(lambda: None)  # ``main`` connects it to the wake port
        self.push_connections = WarmConnections(upstream, PUSH_TIMEOUT_S)

    def server_bind(self) -> None:  # already bound (and listening) by `fedpath-server start`
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # nginx keeps its connections to the relay open
    server: RelayServer

    def do_POST(self) -> None:  # noqa: N802  (http.server's naming)
        route = HELD_ROUTES.get(self.path)
        if route is None and self.path not in PASSED_ROUTES:
            self._refuse(404, f"only POST {', '.join([*HELD_ROUTES, *PASSED_ROUTES])} pass this relay")
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._refuse(411, "a Content-Length is required")
            return
        limit = MAX_BODY if route is not None else self.server.max_push_bytes
        if not 0 <= length <= limit:
            self._refuse(413, f"a request on this route is at most {limit} bytes")
            return
        repeated = [name for name in SIGNED_HEADERS if len(self.headers.get_all(name, ())) > 1]
        if repeated:  # checked here one way, read by the SuperLink another: never passed on
            self._discard_body(length)
            self._refuse(400, f"{', '.join(repeated)} may be sent once")
            return
        if route is not None:
            self._answer(route, length)
            return
        gate = self.server.push_gate
        if gate is None:  # --insecure: no node authentication anywhere, nothing to check here either
            self._answer(route, length)
            return
        site = gate.site(self.headers)
        if isinstance(site, int):
            self._discard_body(length)
            self._refuse(site, "a push passes only from a registered site's key, signed in time" if site == 401
                         else "the relay cannot read the consortium registry; push again")
            return
        if not gate.take(site, PUSH_TIMEOUT_S):
            self._discard_body(length)
            self._refuse(503, f"this site has {gate.per_site} pushes under way; push again")
            return
        try:
            self._answer(route, length)
        finally:
            gate.give_back(site)

    def _discard_body(self, length: int) -> None:
        """Read a refused push's body into nothing, a little of it (``DISCARD_BYTES``, ``DISCARD_S``), so that
        the proxy, which streams bodies on, gets the refusal rather than a reset; then the connection ends."""
        self.close_connection = True
        self.connection.settimeout(DISCARD_S)
        left, deadline = min(length, DISCARD_BYTES), time.monotonic() + DISCARD_S
        try:
            while left > 0 and time.monotonic() < deadline and (chunk := self.rfile.read1(min(left, 64 * 1024))):
                left -= len(chunk)
        except OSError:
            pass

    def _answer(self, route: HeldRoute | None, length: int) -> None:
        body = self.rfile.read(length)
        if len(body) != length:  # the site hung up mid-request: never pass on part of a body as a whole
            self.close_connection = True
            return
        if route is None and self.path == PUSH_MESSAGES and self.server.push_gate is not None:
            if problem := foreign_sender(body):  # the SuperLink would store it (server/push_gate.py)
                self.log_error("refused a push: %s", problem)
                self._refuse(403, "a reply's sender must be the node that pushes it")
                return
        headers = {name: value for name, value in self.headers.items() if name.lower() not in HOP_BY_HOP}
        try:
            answer = self._held(route, body, headers) if route is not None else self._passed(body, headers)
        except (OSError, http.client.HTTPException) as exc:
            target = self.server.upstream
            self.log_error("the SuperLink on %s:%d did not answer: %s", target.host, target.port, exc)
            self._refuse(502, "the SuperLink did not answer")
            return
        try:
            self.send_response(answer.status, answer.reason)
            for name, value in answer.headers:
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
        except (BrokenPipeError, ConnectionResetError):  # the site left while held (its SuperNode stopped)
            self.close_connection = True
            if route is None or not route.not_yet(answer):
                self.log_error("a site left before it received its answer to %s", self.path)

    def _held(self, route: HeldRoute, body: bytes, headers: dict[str, str]) -> Answer:
        connection = self.server.upstream.connect()
        holders = self.server.holders.get(self.path)
        header = next((value for name, value in headers.items() if name.lower() == FLEET_KEY_HEADER), None)
        site = site_of(header) if header else None
        claimed: object | None = None
        if holders is not None and header and site is None:  # a key that cannot be told apart: asked once
            try:
                return _ask_keeping(connection, self.path, body, headers)[0]
            finally:
                connection.close()

        def ask() -> Answer:
            nonlocal claimed
            answer = _ask_keeping(connection, self.path, body, headers)[0]
            # "not yet" means the SuperLink accepted the site's signature: only then is this its pull
            if claimed is None and holders is not None and site and route.not_yet(answer):
                claimed = holders.claim(site)
            return answer

        def still_wanted() -> bool:
            return self._client_connected() and (claimed is None or holders.is_current(site, claimed))

        try:
            return hold(ask, route, self.server.hold_s, still_wanted, self.server.wakeups[self.path])
        finally:
            connection.close()
            if claimed is not None:
                holders.release(site, claimed)

    def _passed(self, body: bytes, headers: dict[str, str]) -> Answer:
        """A push, passed on once; the tracker learns which reply objects are still to come."""
        pushes = self.server.pushes
        if self.path == PUSH_MESSAGES:
            pushes.messages_starting()
        answer, connections = None, self.server.push_connections
        try:
            connection = connections.take()
            reusable = False
            try:
                answer, reusable = _ask_keeping(connection, self.path, body, headers)
            finally:
                connections.give_back(connection, reusable)
            return answer
        finally:
            try:  # the tracker only decides when the ServerApp pulls: never let it fail the push
                self._track(pushes, body, answer)
            except Exception as exc:  # noqa: BLE001
                self.log_error("following the replies failed (%s): the ServerApp falls back to polling", exc)

    def _track(self, pushes: PushTracker, body: bytes, answer: Answer | None) -> None:
        if self.path == PUSH_MESSAGES:
            response = None if answer is None else _decoded(answer, PushMessagesResponse)
            if response is None:
                pushes.messages_pushed(None)
            else:
                pushes.messages_pushed(list(response.objects_to_push), response.session_id)
            return
        stored = None if answer is None else _decoded(answer, PushObjectResponse)
        request = _parsed(PushObjectRequest, body) if stored is not None else None
        if request is not None:  # stored or not (not pending any more): the object is not awaited
            pushes.object_pushed(request.session_id, request.object_id)

    def _client_connected(self) -> bool:
        """False once nginx has closed this connection (the site gave up): it is readable at EOF."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return True
        try:
            return self.connection.recv(1, socket.MSG_PEEK) != b""
        except OSError:
            return False

    def _refuse(self, status: int, text: str) -> None:
        self.send_error(status, explain=text)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  (http.server's signature)
        """Errors only, to the relay's log: nginx's access log already records every request."""

    def log_error(self, format: str, *args: object) -> None:  # noqa: A002
        sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {format % args}\n")
        sys.stderr.flush()


def _ask_keeping(connection: _Connection, path: str, body: bytes, headers: dict[str, str]) -> tuple[Answer, bool]:
    """The answer, and whether the connection may carry another request."""
    connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    payload = response.read()
    return Answer(response.status, response.reason, response.getheaders(), payload), not response.will_close


def bind_listener(host: str) -> socket.socket:
    """A listening socket on a free port of ``host`` (loopback), bound by the start command and
    inherited by the relay."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((host, 0))
        listener.listen(64)
    except OSError:
        listener.close()
        raise
    return listener


def relay_command(listener: socket.socket, upstream: tuple[str, int], tls: tuple[Path, str] | None,
                  hold_s: float, max_push_mb: int, registry: Path | None,
                  wake: tuple[socket.socket, Path] | None = None) -> list[str]:
    """The relay's command line; ``tls`` is (the CA file, the name the SuperLink's certificate must
    carry), None when the SuperLink runs without TLS (``--insecure``); ``max_push_mb`` the largest push
    it passes on (the proxy's limit); ``registry`` the consortium registry (whose keys may push; None when
    the SuperLink runs without node authentication, ``--insecure``);
    ``wake`` the wake port and the file that holds its token."""
    command = [sys.executable, "-m", "server.pull_relay", "--listen-fd", str(listener.fileno()),
               "--upstream", f"{upstream[0]}:{upstream[1]}", "--hold", f"{hold_s:g}",
               "--max-push-mb", str(max_push_mb)] + (["--registry", str(registry)] if registry is not None else [])
    if wake is not None:
        command += ["--wake-fd", str(wake[0].fileno()), "--wake-file", str(wake[1])]
    return command + (["--ca", str(tls[0]), "--tls-name", tls[1]] if tls is not None else ["--insecure"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.pull_relay", description=__doc__.split("\n")[0])
    parser.add_argument("--listen-fd", type=int, required=True, help="an inherited listening socket")
    parser.add_argument("--upstream", required=True, help="the SuperLink's loopback address, HOST:PORT")
    parser.add_argument("--hold", type=float, required=True, help="longest hold of an empty pull, seconds")
    parser.add_argument("--wake-fd", type=int, help="an inherited UDP socket on which the ServerApp announces "
                        "its messages")
    parser.add_argument("--wake-file", type=Path, help="the wake port's file (its token), with --wake-fd")
    parser.add_argument("--max-push-mb", type=int, required=True, help="largest push request passed on, MB")
    parser.add_argument("--registry", type=Path, help="the consortium registry (sites.json): pushes pass only "
                        "from its keys; without it (a SuperLink without node authentication) every push passes")
    parser.add_argument("--tls-name", help="the name the SuperLink's certificate must carry (with --ca)")
    tls = parser.add_mutually_exclusive_group(required=True)
    tls.add_argument("--ca", type=Path, help="the consortium CA the SuperLink's certificate is checked against")
    tls.add_argument("--insecure", action="store_true", help="the SuperLink runs without TLS")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    upstream = Upstream(host, int(port)) if args.insecure else \
        Upstream(host, int(port), ssl.create_default_context(cafile=str(args.ca)), args.tls_name)
    listening = socket.socket(fileno=args.listen_fd)
    with RelayServer(listening, upstream, args.hold, args.max_push_mb * 1024 * 1024, args.registry) as relay:
        announced = ""
        found = read_wake_file(args.wake_file) if args.wake_fd is not None and args.wake_file else None
        if found is not None:
            wake = socket.socket(fileno=args.wake_fd)
            messages = relay.wakeups[MESSAGES]
            announcements = Announcements(wake, found[1], lambda: messages.wake(time.monotonic(), announced=True))
            relay.pushes.on_complete = announcements.replies_complete
            threading.Thread(target=announcements.listen, name="announcements", daemon=True).start()
            announced = f", announcements on udp {':'.join(map(str, wake.getsockname()[:2]))}"
        elif args.wake_fd is not None:  # the ServerApp will poll: slower rounds, nothing unsafe
            announced = f", NO announcements: the wake file {args.wake_file} is missing or unreadable"
        print(f"pull relay on {':'.join(map(str, listening.getsockname()[:2]))} -> SuperLink on {args.upstream}, "
              f"empty pulls held up to {args.hold:g} s{announced}", flush=True)
        try:
            relay.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
