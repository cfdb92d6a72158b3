"""How often fedpath asks Flower's servers again while it waits: a quarter of the time waited, within
bounds, so quick exchanges stay quick and long waits cost few requests (``shared/polling.py``). The
clocks here are fake: each pause is recorded and advances time, nothing sleeps."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flwr.proto.runtime_pb2 import AcquireTaskResponse  # pylint: disable=E0611
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611

from client import task_runner
from server import grid_timeout
from server.grid_timeout import TimeoutGrid
from shared.polling import quarter_step


class FakeClock:
    """``time.monotonic`` and ``time.sleep`` of a module: sleeping only advances the clock."""

    def __init__(self) -> None:
        self.now, self.pauses = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(round(seconds, 6))
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    for module in (task_runner, grid_timeout):
        monkeypatch.setattr(module.time, "monotonic", fake.monotonic)
        monkeypatch.setattr(module.time, "sleep", fake.sleep)
    return fake


def test_the_step_is_a_quarter_of_the_wait_within_its_bounds():
    assert [quarter_step(w, 0.1, 1.0) for w in (0.0, 0.2, 0.4, 1.0, 2.0, 4.0, 60.0)] == \
        [0.1, 0.1, 0.1, 0.25, 0.5, 1.0, 1.0]
    assert quarter_step(3600.0, 0.1, 0.5) == 0.5


class ScriptedSuperNode:
    """AcquireTask answered from a script: True a task, False none; the end of the script stops the runner."""

    def __init__(self, clock: FakeClock, script: list[bool]) -> None:
        self.clock, self.script, self.asked_at = clock, list(script), []

    def AcquireTask(self, request) -> AcquireTaskResponse:  # noqa: N802 - Flower's method name
        if not self.script:
            raise KeyboardInterrupt  # ends serve_forever's loop
        self.asked_at.append(self.clock.now)
        if self.script.pop(0):
            return AcquireTaskResponse(task=Task(task_id=len(self.asked_at)), token="t")
        return AcquireTaskResponse()


def test_an_idle_runner_asks_its_supernode_ever_less_often_and_quickly_again_after_a_task(clock):
    supernode = ScriptedSuperNode(clock, [False] * 30 + [True] + [False] * 3)
    runner = task_runner.TaskRunner(None, None, None, None, "127.0.0.1:1", None)
    runner._acquire_client = lambda: supernode
    served = []
    runner._serve_logged = lambda acquirer, token, task_id: (served.append(task_id), clock.sleep(2.0))
    with pytest.raises(KeyboardInterrupt):
        runner.serve_forever()
    idle = clock.pauses[:30]
    assert idle[:4] == [0.1] * 4 and idle == sorted(idle)  # from 0.1 s, never faster as the wait goes on
    assert idle[-1] == task_runner.IDLE_POLL_S == 1.0 and idle.count(1.0) >= 10
    # 30 asks cover about 20 s of idleness, where a fixed 0.2 s step would have asked about a hundred times
    assert supernode.asked_at[29] - supernode.asked_at[0] > 18
    assert served == [31]
    assert clock.pauses[31:] == [0.1, 0.1, 0.1]  # after the task (its 2 s), quick again: the next stage comes soon


class ScriptedGrid:
    """push_messages/pull_messages of a Grid whose replies come at given times after the push (a reply
    stands in with the one field TimeoutGrid reads)."""

    def __init__(self, clock: FakeClock, reply_after: list[float]) -> None:
        self.clock, self.reply_after, self.pulls = clock, reply_after, 0

    def push_messages(self, messages):
        self.pushed_at, self.messages = self.clock.now, list(messages)
        return [f"m{i}" for i in range(len(self.messages))]

    def pull_messages(self, message_ids):
        self.pulls += 1
        replies = []
        for i in range(len(self.messages)):
            if f"m{i}" in message_ids and self.clock.now - self.pushed_at >= self.reply_after[i]:
                replies.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}")))
        return replies


def _messages(count: int) -> list[str]:
    return [f"message to site {i}" for i in range(count)]  # the grid itself never looks inside


def test_the_server_sees_a_quick_reply_within_a_tenth_of_a_second_and_pulls_rarely_through_a_long_wait(clock):
    quick = ScriptedGrid(clock, [0.25, 0.3])
    assert len(TimeoutGrid(quick, timeout=60).send_and_receive(_messages(2))) == 2
    assert clock.pauses == [0.1, 0.1, 0.1] and quick.pulls == 4

    clock.pauses.clear()
    slow = ScriptedGrid(clock, [1.0, 120.0])  # one site trains for two minutes
    assert len(TimeoutGrid(slow, timeout=600).send_and_receive(_messages(2))) == 2
    assert max(clock.pauses) == grid_timeout.LONGEST_POLL_S == 0.5
    assert slow.pulls < 260  # a fixed 0.2 s step: 600 pulls
    assert sum(clock.pauses) - 120.0 <= 0.5  # the late reply was seen at most one longest step late


def test_the_round_timeout_ends_the_wait_on_time(clock):
    grid = ScriptedGrid(clock, [0.0, 1000.0])  # one site never answers
    replies = TimeoutGrid(grid, timeout=30).send_and_receive(_messages(2))
    assert len(replies) == 1
    assert sum(clock.pauses) == pytest.approx(30.0)  # the last pause ends at the deadline, not after it


class StubRelay:
    """``RelayLink`` with a script: "replies complete" comes at the given times after the push (fake clock)."""

    def __init__(self, clock: FakeClock, signals_at: list[float], heard: bool = True, reachable: bool = True,
                 spurious: bool = False) -> None:
        self.clock, self.signals_at, self.heard, self.reachable = clock, list(signals_at), heard, reachable
        self.spurious, self.announced, self.waits = spurious, 0, []

    def announce(self) -> bool:
        self.announced += 1
        self.pushed_at = self.clock.now
        return self.reachable

    def wait_for_replies(self, seconds: float) -> bool:
        self.waits.append(round(seconds, 6))
        if self.spurious:  # a datagram at once, every time (a flood)
            return True
        due = [t for t in self.signals_at if self.pushed_at + t > self.clock.now]
        if due and self.pushed_at + due[0] - self.clock.now <= seconds:
            self.clock.now = self.pushed_at + due[0]
            self.signals_at.remove(due[0])
            self.heard = True
            return True
        self.clock.now += seconds
        return False


def test_with_the_relay_the_server_pulls_when_it_says_the_replies_are_complete(clock):
    grid, relay = ScriptedGrid(clock, [0.3, 0.35]), StubRelay(clock, signals_at=[0.4])
    assert len(TimeoutGrid(grid, timeout=60, relay=relay).send_and_receive(_messages(2))) == 2
    assert relay.announced == 1 and relay.waits == [grid_timeout.SIGNALLED_POLL_S]
    assert grid.pulls == 2 and clock.now - grid.pushed_at == pytest.approx(0.4)  # right after, not 2 s later

    # a lost signal: the next pull comes SIGNALLED_POLL_S later, never later than that
    grid, relay = ScriptedGrid(clock, [0.3, 0.35]), StubRelay(clock, signals_at=[])
    assert len(TimeoutGrid(grid, timeout=60, relay=relay).send_and_receive(_messages(2))) == 2
    assert relay.waits == [2.0] and grid.pulls == 2

    # before the relay has answered once (a ServerApp's first exchange): the quarter steps, cut short by it
    grid, relay = ScriptedGrid(clock, [0.3, 0.35]), StubRelay(clock, signals_at=[0.4], heard=False)
    assert len(TimeoutGrid(grid, timeout=60, relay=relay).send_and_receive(_messages(2))) == 2
    assert relay.waits[:3] == [0.1, 0.1, 0.1] and relay.heard


def test_without_a_relay_or_flooded_the_server_still_polls_at_most_every_tenth_of_a_second(clock):
    grid, relay = ScriptedGrid(clock, [0.25, 0.3]), StubRelay(clock, signals_at=[0.4], reachable=False)
    assert len(TimeoutGrid(grid, timeout=60, relay=relay).send_and_receive(_messages(2))) == 2
    assert relay.waits == [] and clock.pauses == [0.1, 0.1, 0.1]  # no relay (a simulation): as without one

    clock.pauses.clear()
    grid, relay = ScriptedGrid(clock, [1.0, 1.0]), StubRelay(clock, signals_at=[], spurious=True)
    assert len(TimeoutGrid(grid, timeout=60, relay=relay).send_and_receive(_messages(2))) == 2
    assert grid.pulls <= 11  # a "replies complete" at every wait: still one pull per 0.1 s at most

    grid, relay = ScriptedGrid(clock, [0.0, 1000.0]), StubRelay(clock, signals_at=[])
    start = clock.now
    assert len(TimeoutGrid(grid, timeout=30, relay=relay).send_and_receive(_messages(2))) == 1
    assert clock.now - start == pytest.approx(30.0)  # the round timeout still ends the wait on time
