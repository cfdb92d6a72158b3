"""Flower's legacy workflow waits for every reply without a time limit; a site that dies
mid-round would hang the run. This Grid gives every exchange the round timeout, after which
the round goes on with the replies that arrived. It also hands every reply to its observers:
the wire log when the run asks for one, the strategy, which learns from error replies which
site refused (SecAgg+ stages report failures to the strategy without their node), and the SecAgg+
signature relay, which also adds the sites' signatures to the outgoing messages.

It polls the SuperLink for replies through the Grid's own ``push_messages`` and ``pull_messages``,
where Flower's ``send_and_receive`` sleeps 3 s between pulls (a SecAgg+ round is five exchanges, so
that sleep alone added about 6 s to every secure round here): after a quarter of the time already
waited, from ``POLL_S`` up to ``LONGEST_POLL_S`` (``shared/polling.py``). A quick exchange is seen
within a tenth of a second; a site training for minutes costs the SuperLink two asks a second, not
five. With the sites' pull relay (``server/relay_signals.py``) it announces each push, so the sites
get their messages at once, and pulls when the relay says the replies pushed so far are complete
(then every 2 s at most, should a signal be lost): a reply pulled while its arrays were still
arriving cost Flower's fixed 1 s back-off."""

from __future__ import annotations

import time
from typing import Callable, Iterable

from flwr.app import Message

from server.relay_signals import RelayLink
from shared.polling import quarter_step

POLL_S, LONGEST_POLL_S = 0.1, 0.5
"""Shortest and longest pause between two pulls of the replies (each one request to the SuperLink on
the server host)."""
SIGNALLED_POLL_S = 2.0  # the longest pause while the relay says when replies are complete


class TimeoutGrid:
    """Flower's Grid with the round timeout on every exchange.

    Args:
        grid: the Grid Flower gives the ServerApp.
        timeout: seconds an exchange waits for its replies.
        observers: each gets every exchange's replies.
        outgoing: each may transform every exchange's messages before they are pushed.
        relay: the link to the sites' pull relay (``server/relay_signals.py``); None polls only.
    """

    def __init__(self, grid, timeout: float, observers: Iterable[Callable[[list[Message]], None]] = (),
                 outgoing: Iterable[Callable[[list[Message]], list[Message]]] = (),
                 relay: RelayLink | None = None) -> None:
        self._grid, self._timeout, self._observers = grid, timeout, list(observers)
        self._outgoing, self._relay = list(outgoing), relay

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pushed = time.monotonic()
        deadline = pushed + (self._timeout if timeout is None else timeout)
        messages = list(messages)
        for transform in self._outgoing:  # e.g. the SecAgg+ signature relay
            messages = transform(messages)
        waiting = set(self._grid.push_messages(messages))
        relay = self._relay if self._relay is not None and self._relay.announce() else None
        replies: list[Message] = []
        while waiting:
            arrived = list(self._grid.pull_messages(waiting))
            replies += arrived
            waiting -= {reply.metadata.reply_to_message_id for reply in arrived}
            now = time.monotonic()
            if not waiting or now >= deadline:
                break
            pause = min(quarter_step(now - pushed, POLL_S, LONGEST_POLL_S), deadline - now)
            if relay is None:
                time.sleep(pause)
            else:  # once the relay has signalled complete replies, pull on its word (or after the longer pause)
                relay.wait_for_replies(min(SIGNALLED_POLL_S, deadline - now) if relay.heard else pause)
                time.sleep(max(0.0, min(POLL_S - (time.monotonic() - now), deadline - time.monotonic())))
        for observe in self._observers:
            observe(replies)
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
