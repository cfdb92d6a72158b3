"""How long to wait before asking again for something that is not there yet.

Why: Flower 1.42 offers no way to be told that a message, reply or task has arrived, so fedpath asks:
the site's task runner asks its SuperNode for a task, the ServerApp asks the SuperLink for the sites'
replies, the pull relay asks the SuperLink for a site's message. Every ask costs the process that
answers it CPU (about 4 ms for a SuperNode, 10 ms for the SuperLink, measured here), and a fixed
short step pays that through every long wait: an idle site asking five times a second kept 2-3 % of
a core busy (its SuperNode and runner together) for nothing.

Asking again after a quarter of the time already waited bounds how late an arrival is seen to a
quarter of the wait (short waits, like a SecAgg+ round's quick exchanges, stay fast) and turns a long
wait into a few asks, one per ``longest_s`` at most.
"""

from __future__ import annotations


def quarter_step(waited_s: float, shortest_s: float, longest_s: float) -> float:
    """Seconds until the next ask: a quarter of ``waited_s``, kept within ``[shortest_s, longest_s]``.

    Args:
        waited_s: seconds since the wait began (for a task runner: since its last task ended).
        shortest_s: the step at the start of a wait.
        longest_s: the step a long wait settles at; an arrival is seen at most this late.
    """
    return min(longest_s, max(shortest_s, waited_s / 4))
