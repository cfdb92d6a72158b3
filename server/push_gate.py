"""Whose push bodies the pull relay reads into memory, and how many of each site's at once.

Why: Flower's SuperLink checks a push's node authentication only once it has the request, and the
relay (``server/pull_relay.py``) reads a push's body whole before passing it on, up to
``superlink.max_request_mb``. Without a check of its own first, anyone who reaches the sites' port
could fill the server host's memory with pushes of the largest size, or, under one cap for all,
hold every site's pushes back with a few slow ones. So the relay checks Flower's node-authentication
headers itself before it reads a body: a key of the consortium registry, a fresh timestamp, the key's
signature of it; and a registered site has at most ``PUSHES_PER_SITE`` bodies read at once.
The SuperLink checks everything again when the relay passes the push on.

One thing the SuperLink does not check (Flower 1.42): that the replies a node pushes name that node as
their sender. It ties the request's node id to the signing key, and a reply to the message it answers
by the reply's own ``src_node_id``; so a registered site that guessed another site's message id (a hash
of metadata it mostly knows) could answer for it first: a refusal or an update in its name. The relay
reads every reply push and refuses one whose replies name another sender (``foreign_sender``).
"""

from __future__ import annotations

import base64
import binascii
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
from flwr.proto.fleet_pb2 import PushMessagesRequest  # pylint: disable=no-name-in-module
from flwr.supercore.constant import (
    FLEET_HTTP_PUBLIC_KEY_HEADER as FLEET_KEY_HEADER,  # "flwr-public-key"
    FLEET_HTTP_SIGNATURE_HEADER as FLEET_SIGNATURE_HEADER,
)
from google.protobuf.message import DecodeError

from server.site_registry import RegistryError, SiteRegistry
from shared.file_memo import file_version
from shared.site_keys import public_key_line

PUSHES_PER_SITE = 2  # push bodies of one site read at once: Flower's SuperNode pushes on 2 threads
WAITING_PER_SITE = 8  # pushes of one site that may wait for those (a thread each); more are answered 503 at once
# Node authentication: the gate reads the first of a repeated header and the relay would pass on the last, so a
# request that repeats one is refused before either (``server/pull_relay.py``).
SIGNED_HEADERS = (FLEET_KEY_HEADER, FLEET_SIGNATURE_HEADER, TIMESTAMP_HEADER)


def key_bytes(header: str) -> bytes | None:
    """The public key a request names in its key header, as the SuperLink reads it: surrounding blanks
    stripped, strict base64; None if it is not. Not the header's text: base64 of a key whose length is not
    a multiple of 3 has unused bits, so several texts name the same key (and the SuperLink accepts each)."""
    try:
        return base64.b64decode(header.strip(" \t"), validate=True)
    except (binascii.Error, ValueError):
        return None


class PushGate:
    """Whose push bodies the relay reads into memory, and how many of each site's at once.

    The same checks as the SuperLink's node authentication, before the body is read: the public key is
    one of the consortium registry (``state_dir/sites.json``, read again when it changes), the timestamp
    is within the SuperLink's window and the key signed it. The SuperLink still checks everything (and
    that the key is the node's the request names) when the relay passes the push on.

    Args:
        registry: the consortium registry of the sites and their public keys.
        per_site: how many of one site's pushes are read at once; more wait, unread.
        waiting_per_site: how many of one site's pushes may wait; more are refused at once (503).
    """

    def __init__(self, registry: Path, per_site: int = PUSHES_PER_SITE,
                 waiting_per_site: int = WAITING_PER_SITE) -> None:
        self.registry, self.per_site, self.waiting_per_site = Path(registry), per_site, waiting_per_site
        self._waiting: dict[str, int] = {}
        self._members: frozenset[str] | None = None  # None: the registry cannot be read
        self._version: tuple[int, ...] | None = None
        self._in_flight: dict[str, int] = {}
        self._changed = threading.Condition()

    def site(self, headers) -> str | int:
        """The registered key (its OpenSSH line) that signed these request headers in time, or the status
        to refuse the push with: 401 for anyone else (as the SuperLink would answer), 503 while the registry
        cannot be read (Flower's SuperNode stops itself on a 401 and retries a 503)."""
        public = key_bytes(headers.get(FLEET_KEY_HEADER, ""))
        if public is None:
            return 401
        try:
            signature = base64.b64decode(headers.get(FLEET_SIGNATURE_HEADER, ""), validate=True)
            timestamp = headers.get(TIMESTAMP_HEADER, "")
            age = (datetime.now(timezone.utc) - datetime.fromisoformat(timestamp)).total_seconds()
            key = serialization.load_pem_public_key(public)
            line = public_key_line(key)
        except (ValueError, TypeError, AttributeError, binascii.Error, UnsupportedAlgorithm):
            return 401
        members = self._registered()
        if members is None:
            return 503
        if line not in members or not -SYSTEM_TIME_TOLERANCE < age < TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE:
            return 401  # membership first: a stranger's own key and signature cost no signature check
        try:
            key.verify(signature, timestamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, TypeError, ValueError):
            return 401
        return line

    def take(self, site: str, timeout: float) -> bool:
        """Wait until ``site`` has fewer than ``per_site`` pushes being read, at most ``timeout`` seconds."""
        with self._changed:
            if self._in_flight.get(site, 0) >= self.per_site and self._waiting.get(site, 0) >= self.waiting_per_site:
                return False  # a registered site's flood of pushes holds no more threads than this
            self._waiting[site] = self._waiting.get(site, 0) + 1
            try:
                if not self._changed.wait_for(lambda: self._in_flight.get(site, 0) < self.per_site, timeout):
                    return False
            finally:
                self._waiting[site] -= 1
                if not self._waiting[site]:
                    del self._waiting[site]
            self._in_flight[site] = self._in_flight.get(site, 0) + 1
            return True

    def waiting(self, site: str) -> int:
        """How many of ``site``'s pushes wait now, unread (the relay's log and tests)."""
        with self._changed:
            return self._waiting.get(site, 0)

    def give_back(self, site: str) -> None:
        with self._changed:
            self._in_flight[site] -= 1
            if not self._in_flight[site]:
                del self._in_flight[site]
            self._changed.notify_all()

    def _registered(self) -> frozenset[str] | None:
        """The registry's public key lines, read again when the file changes; None while it cannot be read."""
        with self._changed:
            try:
                stat = self.registry.stat()
                version = file_version(stat)
            except OSError as exc:
                version, error = None, exc
            else:
                if version == self._version:
                    return self._members
                try:
                    entries = SiteRegistry(self.registry).entries()
                    self._members = frozenset(str(entry["public_key"]) for entry in entries.values())
                    self._version = version
                    return self._members
                except (RegistryError, KeyError, TypeError, ValueError, AttributeError) as exc:
                    error = exc
            if self._version != ("unreadable", str(error)):  # said once, not at every push
                sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} cannot read the registry {self.registry}: "
                                 f"every push is answered 503 (retried) until it can ({error})\n")
                sys.stderr.flush()
            self._members, self._version = None, ("unreadable", str(error))
            return None


def foreign_sender(body: bytes) -> str | None:
    """What is wrong with a reply push whose replies name another node than the one pushing them as
    their sender, or None (also for a body that is not a push at all: the SuperLink refuses that)."""
    try:
        request = PushMessagesRequest.FromString(body)
    except DecodeError:
        return None
    pusher = request.node.node_id
    others = sorted({message.metadata.src_node_id for message in request.messages_list} - {pusher})
    return f"node {pusher} pushed replies in the name of node(s) {others}" if others else None
