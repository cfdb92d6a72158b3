"""Flower's legacy workflow waits for every reply without a time limit; a site that dies
mid-round would hang the run. This Grid gives every exchange the round timeout, after which
the round goes on with the replies that arrived."""

from __future__ import annotations

from typing import Iterable

from flwr.app import Message


class TimeoutGrid:
    def __init__(self, grid, timeout: float) -> None:
        self._grid, self._timeout = grid, timeout

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=self._timeout if timeout is None else timeout)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
