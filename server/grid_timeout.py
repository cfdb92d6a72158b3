"""Flower's legacy workflow waits for every reply without a time limit; a site that dies
mid-round would hang the run. This Grid gives every exchange the round timeout, after which
the round goes on with the replies that arrived. It also hands every reply to its observers:
the wire log when the run asks for one, and the strategy, which learns from error replies which
site refused (SecAgg+ stages report failures to the strategy without their node)."""

from __future__ import annotations

from typing import Callable, Iterable

from flwr.app import Message


class TimeoutGrid:
    def __init__(self, grid, timeout: float, observers: Iterable[Callable[[list[Message]], None]] = ()) -> None:
        self._grid, self._timeout, self._observers = grid, timeout, list(observers)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=self._timeout if timeout is None else timeout))
        for observe in self._observers:
            observe(replies)
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
