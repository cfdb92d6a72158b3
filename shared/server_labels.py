"""Names the server chooses (round id, message type, SecAgg+ stage), as the site writes them down.

Flower's own are short and plain ("3", "train", "share_keys"), but a server may send megabytes of
round id with every message, or line breaks and terminal escapes. Written as they came, they would
fill the hospital's disk through its egress log and its log, and make ``fedpath-site egress show``
print records that do not exist. So they are written as they came only when short and plain.
Longer texts that may carry them (a library's error reason) go into the site's log escaped and cut
(``log_text``).
"""

from __future__ import annotations

import hashlib
import re

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
