"""Two signals between the ServerApp and the sites' pull relay, so that neither side waits out a poll.

Why: in every exchange the sites' messages and their replies each sat waiting for someone's next
poll. The relay asked the SuperLink for a site's message a few times a second. Worse, a site's reply
is visible to the ServerApp as soon as its SuperNode has pushed the message, while its arrays
(objects) are still on their way. A ServerApp that pulled it then found an object missing, and
Flower's object pull backs off a fixed 1 s (``flwr/supercore/constant.py``, no setting): about half of
the exchanges of a SecAgg+ round paid it (docs/benchmarks.md, "Signals instead of clocks").

- **Pushed** (ServerApp to relay): right after pushing a stage's messages the ServerApp sends one
  datagram to the relay's wake port; every held pull asks the SuperLink again at once.
- **Replies complete** (relay to ServerApp): the relay passes the sites' pushes on to the SuperLink
  and follows each reply's objects (Flower's push session: the objects the SuperLink still
  needs). When a reply has completed and none is still arriving, it sends one datagram back to the
  ServerApp that announced last; the ServerApp pulls the replies then, each one complete.

Each side still polls, every 2 s, should a datagram be lost, and a ServerApp's first exchange polls
as before until the relay has answered once. The datagrams carry nothing of the federation, only
"now". Only the server's own processes can take part: the wake port is on loopback, and an
announcement must carry the token in ``state_dir/pull_relay.wake`` (a file only the server's user can
read, written by the start command with the port); the ServerApp's socket is connected to the
relay's port, so the kernel drops datagrams from anyone else. The relay acts on at most 20
announcements a second, and the ServerApp pulls at most every 0.1 s. The relay follows one
announcer: the consortium runs one federation at a time (a second run's ServerApp still works, by
its 2 s polls).
"""

from __future__ import annotations

import logging
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from shared.atomic_files import atomic_write_bytes

log = logging.getLogger("fedpath.server")

WAKE_HOST = "127.0.0.1"  # the ServerApp runs beside the SuperLink (Flower's subprocess isolation)
PUSHED, REPLIES = b"pushed ", b"replies"
ANNOUNCE_SPACING_S = 0.05  # at most 20 announcements a second are acted on
STALE_PUSH_S = 60.0
"""A reply with no object stored for this long is given up (its site died mid-push; a 5 MB chunk takes
well under a second here). Flower keeps a push session 180 s; until this expires the ServerApp only
falls back to its 2 s polls."""


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
    """Write the wake port's address and a fresh token, readable by the server's user only
    (``mkstemp``); the relay and the ServerApp read the token from it."""
    host, port = wake.getsockname()[:2]
    atomic_write_bytes(path, f"{host}:{port} {secrets.token_hex(16)}\n".encode(), mode=0o600)


def read_wake_file(wake_file: Path) -> tuple[tuple[str, int], bytes] | None:
    """The wake port and the token named in ``wake_file``; None without the file or for anything but
    a loopback port (the start command writes nothing else)."""
    try:
        address, token = wake_file.read_text().split()
        host, _, port = address.rpartition(":")
        number = int(port)
    except (OSError, ValueError):
        return None
    if host != WAKE_HOST or not 0 < number < 65536 or not token:
        return None
    return (host, number), token.encode()


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
        found = read_wake_file(self.wake_file)
        if found is None:
            return False
        address, token = found
        try:
            if self._socket is None:
                link = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    link.bind((WAKE_HOST, 0))
                    link.connect(address)  # from now on the kernel passes only the relay's datagrams
                except OSError:
                    link.close()
                    raise
                self._socket = link
            self._socket.send(PUSHED + token)
        except OSError as exc:
            log.debug("no announcement to the pull relay: %s", exc)
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
        except OSError:  # the relay's port is closed (it stopped): poll from here on
            self.close()
        self.heard |= complete
        return complete

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the relay's "replies complete" comes to (None before the first announcement)."""
        return None if self._socket is None else self._socket.getsockname()[:2]

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class Announcements:
    """The relay's side of the wake port: wakes held pulls at each announcement that carries the
    token, and sends "replies complete" back to the ServerApp that announced last.

    Args:
        wake: the inherited wake port.
        token: the token of ``pull_relay.wake``.
        on_pushed: called at each announcement (at most once every ``spacing_s``).
    """

    def __init__(self, wake: socket.socket, token: bytes, on_pushed: Callable[[], None],
                 spacing_s: float = ANNOUNCE_SPACING_S) -> None:
        self.wake, self.on_pushed, self.spacing_s = wake, on_pushed, spacing_s
        self._expected = PUSHED + token
        self._announcer: tuple[str, int] | None = None
        self._stopped = threading.Event()

    def listen(self) -> None:
        """Until ``stop`` or the socket fails; announcements that come during the pause after a wake
        make one more wake after it, however many they were."""
        self.wake.settimeout(0.5)  # to see ``stop``: closing a socket does not end a blocked receive
        pending = False
        while not self._stopped.is_set():
            if not pending:
                try:
                    data, sender = self.wake.recvfrom(64)
                except TimeoutError:
                    continue
                except OSError as exc:
                    log.error("the wake port failed, announcements are no longer heard: %s", exc)
                    return
                if not self._genuine(data, sender):
                    continue
            self.on_pushed()
            time.sleep(self.spacing_s)
            pending = self._drain()

    def _genuine(self, data: bytes, sender) -> bool:
        if data != self._expected or sender[0] != WAKE_HOST:
            return False
        self._announcer = sender[:2]
        return True

    def _drain(self) -> bool:
        """Read what came during the pause; True if a genuine announcement was among it."""
        genuine = False
        while True:
            try:
                data, sender = self.wake.recvfrom(64, socket.MSG_DONTWAIT)
            except OSError:  # nothing more (BlockingIOError), or the socket is gone
                return genuine
            genuine |= self._genuine(data, sender)

    def stop(self) -> None:
        self._stopped.set()

    def replies_complete(self) -> None:
        """Tell the last announcer that no reply is still arriving."""
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
    has been pushed. A push the SuperLink refused (a stranger's, say) completes nothing.

    Args:
        on_complete: called when a reply has completed and none is still arriving.
        clock: seconds, for giving up on a reply whose site died mid-push (``STALE_PUSH_S``).
    """

    def __init__(self, on_complete: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.on_complete, self.clock = on_complete, clock
        self._lock = threading.Lock()
        self._announcing = 0  # push-messages requests on their way to the SuperLink
        self._sessions: dict[str, tuple[set[str], float]] = {}
        self._completed = False  # a reply completed since the last ``on_complete``

    def messages_starting(self) -> None:
        """A push-messages request is on its way to the SuperLink."""
        with self._lock:
            self._announcing += 1

    def messages_pushed(self, objects: list[str] | None, session: str = "") -> None:
        """The push-messages request is over: ``objects`` the SuperLink still needs, in push session
        ``session``; None if it refused or failed."""
        with self._lock:
            self._announcing = max(0, self._announcing - 1)
            if objects:
                self._sessions[session] = (set(objects), self.clock())
            elif objects is not None:
                self._completed = True  # the SuperLink had every object already
        self._settle()

    def object_pushed(self, session: str, object_id: str) -> None:
        """The SuperLink answered a push of ``object_id`` in ``session`` with success."""
        with self._lock:
            waiting = self._sessions.get(session)
            if waiting is None:
                return
            waiting[0].discard(object_id)
            if waiting[0]:
                self._sessions[session] = (waiting[0], self.clock())  # alive: not stale
                return
            del self._sessions[session]
            self._completed = True
        self._settle()

    def arriving(self) -> int:
        with self._lock:
            return self._announcing + len(self._sessions)

    def _settle(self) -> None:
        now = self.clock()
        with self._lock:
            for session in [s for s, (_, since) in self._sessions.items() if now - since > STALE_PUSH_S]:
                del self._sessions[session]
            signal = self._completed and self._announcing == 0 and not self._sessions
            if signal:
                self._completed = False
        if signal:
            self.on_complete()
