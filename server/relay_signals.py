"""Two signals between the ServerApp and the sites' pull relay, so that neither side waits by the clock.

Why: in every exchange the sites' messages and their replies each sat waiting for someone's next
poll. The relay asked the SuperLink for a site's message a few times a second. Worse, a site's reply
is visible to the ServerApp as soon as its SuperNode has pushed the message, while its arrays
(objects) are still on their way. A ServerApp that pulled it then found an object missing, and
Flower's object pull backs off a fixed 1 s (``flwr/supercore/constant.py``, no setting): about half of
the exchanges of a SecAgg+ round paid it (docs/benchmarks.md, "Where a round's time goes").

- **Pushed** (ServerApp to relay): right after pushing a stage's messages the ServerApp sends one
  datagram to the relay's wake port; every held pull asks the SuperLink again at once.
- **Replies complete** (relay to ServerApp): the relay passes the sites' pushes on to the SuperLink
  and follows each reply's objects (Flower's push session: the objects the SuperLink still
  needs). When none is still arriving it sends one datagram back to the address the last
  announcement came from; the ServerApp pulls the replies then, each one complete.

Each side still polls, slowly, should a datagram be lost. The datagrams carry no data of the
federation, only "now": the wake port is on loopback, and the relay acts on at most 20 of them a
second, so a local program that floods it costs the SuperLink at most that many asks per held pull.
The wake port's address is in the server's state folder (``pull_relay.wake``), written by the start
command; without the file (a simulation, or the relay off) the ServerApp polls as before.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flwr.proto.fleet_pb2 import PushMessagesResponse  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=no-name-in-module
from google.protobuf.message import DecodeError

from shared.atomic_files import atomic_write_bytes

WAKE_HOST = "127.0.0.1"  # the ServerApp runs beside the SuperLink (Flower's subprocess isolation)
PUSHED, REPLIES = b"pushed", b"replies"
ANNOUNCE_SPACING_S = 0.05  # at most 20 announcements a second are acted on
STALE_PUSH_S = 30.0  # a reply still incomplete after this is given up (its site died mid-push)


def bind_wake_port() -> socket.socket:
    """The relay's wake port: a UDP socket on a free loopback port, bound by the start command and
    inherited by the relay; ``write_wake_file`` tells the ServerApp where it is."""
    wake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        wake.bind((WAKE_HOST, 0))
    except OSError:
        wake.close()
        raise
    return wake


def write_wake_file(path: Path, wake: socket.socket) -> None:
    host, port = wake.getsockname()[:2]
    atomic_write_bytes(path, f"{host}:{port}\n".encode())


def relay_address(wake_file: Path) -> tuple[str, int] | None:
    """The wake port named in ``wake_file``; None without the file or for anything but loopback (the
    start command writes loopback only)."""
    try:
        host, _, port = wake_file.read_text().strip().rpartition(":")
        address = (host, int(port))
    except (OSError, ValueError):
        return None
    return address if host == WAKE_HOST else None


class RelayLink:
    """The ServerApp's side: announces its pushes, and waits for the relay's "replies complete".

    Args:
        wake_file: the server's ``pull_relay.wake`` (``server/superlink.py: StatePaths``).
    """

    def __init__(self, wake_file: Path) -> None:
        self.wake_file = wake_file
        self.heard = False  # the relay has said "replies complete" at least once: it follows pushes
        self._socket: socket.socket | None = None

    def announce(self) -> bool:
        """Tell the relay that messages were just pushed; False (nothing sent) when there is no relay."""
        address = relay_address(self.wake_file)
        if address is None:
            return False
        if self._socket is None:
            self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._socket.bind((WAKE_HOST, 0))
        try:
            self._socket.sendto(PUSHED, address)
        except OSError:
            return False
        return True

    def wait_for_replies(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True as soon as the relay says the replies pushed so far are complete."""
        if self._socket is None:
            time.sleep(max(0.0, seconds))
            return False
        readable, _, _ = select.select([self._socket], [], [], max(0.0, seconds))
        if not readable:
            return False
        complete = False
        try:
            while True:  # every datagram that has come counts as one
                complete |= self._socket.recv(64, socket.MSG_DONTWAIT) == REPLIES
        except BlockingIOError:
            pass
        self.heard |= complete
        return complete

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class Announcements:
    """The relay's side of the wake port: wakes held pulls at each announcement and sends "replies
    complete" back to whoever announced last (from loopback only).

    Args:
        wake: the inherited wake port.
        on_pushed: called at each announcement (at most once every ``spacing_s``).
    """

    def __init__(self, wake: socket.socket, on_pushed: Callable[[], None],
                 spacing_s: float = ANNOUNCE_SPACING_S) -> None:
        self.wake, self.on_pushed, self.spacing_s = wake, on_pushed, spacing_s
        self._announcer: tuple[str, int] | None = None

    def listen(self) -> None:
        """Until the socket is closed; datagrams that come during a pause count as one."""
        while True:
            try:
                data, sender = self.wake.recvfrom(64)
            except OSError:
                return
            if data != PUSHED or sender[0] != WAKE_HOST:
                continue
            self._announcer = sender[:2]
            self.on_pushed()
            time.sleep(self.spacing_s)
            try:
                while self.wake.recv(64, socket.MSG_DONTWAIT):
                    pass
            except BlockingIOError:
                pass
            except OSError:
                return

    def replies_complete(self) -> None:
        announcer = self._announcer
        if announcer is not None:
            try:
                self.wake.sendto(REPLIES, announcer)
            except OSError:  # the ServerApp has ended: the next one announces itself
                pass


class PushTracker:
    """Which sites' replies are still arriving, from the pushes the relay passes on.

    A reply counts from the moment its push-messages request reaches the relay (the SuperLink lists
    it to the ServerApp from then on) until the last object the SuperLink asked for in its answer
    has been stored. ``on_complete`` is called whenever that leaves nothing arriving.
    """

    def __init__(self, on_complete: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.on_complete, self.clock = on_complete, clock
        self._lock = threading.Lock()
        self._announcing = 0  # push-messages requests on their way to the SuperLink
        self._sessions: dict[str, tuple[set[str], float]] = {}

    def messages_starting(self) -> None:
        with self._lock:
            self._announcing += 1

    def messages_pushed(self, status: int, body: bytes) -> None:
        """The SuperLink's answer to a push-messages request (any status: the request is over)."""
        response = _parsed(PushMessagesResponse, body) if status == 200 else None
        with self._lock:
            self._announcing -= 1
            if response is not None and response.objects_to_push:
                self._sessions[response.session_id] = (set(response.objects_to_push), self.clock())
        self._settle()

    def object_pushed(self, status: int, request: bytes) -> None:
        if status != 200:
            return  # not stored: the site retries, or the session goes stale
        pushed = _parsed(PushObjectRequest, request)
        if pushed is None:
            return
        with self._lock:
            waiting = self._sessions.get(pushed.session_id)
            if waiting is None:
                return
            waiting[0].discard(pushed.object_id)
            if waiting[0]:
                return
            del self._sessions[pushed.session_id]
        self._settle()

    def arriving(self) -> int:
        with self._lock:
            return self._announcing + len(self._sessions)

    def _settle(self) -> None:
        now = self.clock()
        with self._lock:
            for session in [s for s, (_, since) in self._sessions.items() if now - since > STALE_PUSH_S]:
                del self._sessions[session]
            idle = self._announcing == 0 and not self._sessions
        if idle:
            self.on_complete()


def _parsed(message_class, body: bytes):
    try:
        return message_class.FromString(body)
    except DecodeError:
        return None
