"""Names the server chooses (round id, message type, SecAgg+ stage), as the site writes them down.

Flower's own are short and plain ("3", "train", "share_keys"), but a server may send megabytes of
round id with every message, or line breaks and terminal escapes. Written as they came, they would
fill the hospital's disk through its egress log and its log, and make ``fedpath-site egress show``
print records that do not exist. So they are written as they came only when short and plain.
Longer texts that may carry them (a library's error reason, an exception's message and those of
the exceptions it came from) go into the site's log escaped and cut (``log_text``, ``exception_text``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import traceback

PLAIN_LABEL = re.compile(r"[A-Za-z0-9._:/-]{0,64}")


def server_label(value: str | None) -> str | None:
    """``value`` as it came when it is at most 64 letters, digits and ``._:/-``; otherwise only its
    length and the start of its sha256."""
    if value is None or PLAIN_LABEL.fullmatch(value):
        return value
    digest = hashlib.sha256(value.encode("utf-8", errors="replace")).hexdigest()[:16]
    return f"(not shown: {len(value)} characters, sha256 {digest})"


LOG_TEXT_LIMIT = 300


def log_text(value: str, limit: int = LOG_TEXT_LIMIT) -> str:
    """``value`` for one line of the site's log: line breaks and escapes shown as escapes, cut after
    ``limit`` characters with the full length named, so it can neither forge lines nor fill the disk."""
    shown = value[:limit].encode("unicode_escape").decode("ascii")
    return shown if len(value) <= limit else f"{shown}... ({len(value)} characters)"


CHAINED_EXCEPTIONS = 5


def exception_text(exc: BaseException, limit: int = LOG_TEXT_LIMIT) -> str:
    """``exc`` and the exceptions it came from, for the site's log, outermost first, messages through ``log_text``.

    Each exception of the chain (``raise ... from``, or raised while handling another) is one
    escaped line ``Type: message`` followed by its frames, the site's own code, as they are. The
    chain is followed for at most ``CHAINED_EXCEPTIONS`` links: a library's wrapped error carries
    what the server sent in its cause as often as in its own message.
    """
    parts, seen, current = [], set(), exc
    while current is not None and id(current) not in seen and len(parts) < CHAINED_EXCEPTIONS:
        seen.add(id(current))
        frames = "".join(traceback.format_tb(current.__traceback__)).rstrip()
        parts.append(log_text(f"{type(current).__name__}: {current}", limit) + (f"\n{frames}" if frames else ""))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    more = current is not None and id(current) not in seen
    return "\n  which came from:\n".join(parts) + ("\n  (further chained exceptions not shown)" if more else "")


class EscapingFormatter(logging.Formatter):
    """The site log's formatter: a ``log.exception`` anywhere in the site's process writes the
    exception chain through ``exception_text``, so no library message forges a line there."""

    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        return exception_text(ei[1])
