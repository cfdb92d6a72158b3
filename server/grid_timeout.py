"""Flower's legacy workflow waits for every reply without a time limit; a site that dies
mid-round would hang the run. This Grid gives every exchange the round timeout, after which
the round goes on with the replies that arrived. It also hands every reply to the wire log
when the run asks for one."""

from __future__ import annotations

from typing import Iterable

from flwr.app import Message

from server.wire_log import WireLog


class TimeoutGrid:
    def __init__(self, grid, timeout: float, wire_log: WireLog | None = None) -> None:
        self._grid, self._timeout, self._wire_log = grid, timeout, wire_log

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=self._timeout if timeout is None else timeout))
        if self._wire_log is not None:
            self._wire_log.record(replies)
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
