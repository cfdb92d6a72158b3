"""Why a deleted or rolled-back privacy ledger cannot start a federation's budget afresh.

A site's ledger (``state_dir/ledgers/<federation>.json``) is the only record of the privacy it spent in
a federation. Deleted by mistake, restored from an older backup, or copied back from another machine,
it would let the site plan the same federation again from ε = 0 and train its full budget a second
time: the privacy promise would fail open, and nothing in the ledger itself can tell.

The egress log (``state_dir/egress.jsonl``, ``client/egress_log.py``) is another file, hash-chained,
checked against its head file at every start of the task runner, and since 2026-12-05 it names the
federation of every reply that carried a training update (``"trained": <federation>``). Each such
update left only after the ledger recorded its training, so a ledger always records at least as many
trainings as the egress log shows updates sent. The task runner checks that, with this guard:

- before the ClientApp runs for a message whose round plan names a federation: a ledger that records
  fewer trainings than the egress log shows updates sent is behind; the message is refused (code 18),
  nothing runs and nothing is written into the ledger;
- after it ran: a ledger that now records fewer trainings than before (replaced while the round ran)
  withholds the reply (code 18).

What it cannot see (``docs/security.md`` §4): the ledger and the egress log replaced together (the
whole state folder restored or moved), and the updates sent before this version (their egress records
do not name a federation).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from client.privacy_ledger import federation_ledger, recorded_trainings

LEDGER_BEHIND = 18
"""The refusal code (``shared/refusals.py``) of a message whose federation's ledger is behind."""
TRAINED_KEY = "trained"
"""The egress record's key naming the federation of a reply that carried a training update."""


class LedgerBehind(Exception):
    """The federation's ledger records fewer trainings than this site has sent updates."""


class LedgerGuard:
    """Compares each federation's ledger with the updates the egress log shows sent.

    Args:
        state_dir: the site's state folder (its ledgers and its egress log).
        records: the egress log's records, oldest first (``EgressLog.verify()``).
    """

    def __init__(self, state_dir: Path, records: Iterable[dict[str, Any]]) -> None:
        self.state_dir = Path(state_dir)
        self.sent: Counter[str] = Counter(
            record[TRAINED_KEY] for record in records
            if record.get("event") == "reply" and record.get("outcome") == "sent"
            and isinstance(record.get(TRAINED_KEY), str))

    def before(self, federation: str) -> int | None:
        """The trainings the federation's ledger records before the ClientApp runs (None: unreadable,
        which the ClientApp's ledger refuses itself, code 2). Raises LedgerBehind when they are fewer
        than the updates sent."""
        trainings = recorded_trainings(federation_ledger(self.state_dir, federation))
        if trainings is not None and trainings < self.sent[federation]:
            raise LedgerBehind(
                f"{federation_ledger(self.state_dir, federation)} records {trainings} training round(s), but this "
                f"site's egress log shows {self.sent[federation]} update(s) sent in federation {federation}: the "
                "ledger was deleted or restored from an older copy, and planning the federation again would spend "
                "its privacy a second time. Restore the latest copy of the ledger (the data-protection officer "
                "decides); until then this federation's messages are refused (code 18) and nothing runs")
        return trainings

    def trained(self, federation: str, before: int | None) -> bool:
        """Whether the ClientApp's run recorded a training in the federation's ledger, i.e. whether its
        reply carries an update. Raises LedgerBehind when the ledger shrank while it ran."""
        if before is None:  # unreadable before: the ClientApp's ledger refused the round (code 2), nothing trained
            return False
        after = recorded_trainings(federation_ledger(self.state_dir, federation))
        if after is None or after < before:
            shown = "none readable" if after is None else after
            raise LedgerBehind(f"{federation_ledger(self.state_dir, federation)} recorded {before} training round(s) "
                               f"before the round ran and {shown} after: it was replaced meanwhile; the reply is "
                               "withheld (code 18)")
        return after > before

    def note_sent(self, federation: str) -> None:
        """Count an update of ``federation`` that the egress log now records as sent."""
        self.sent[federation] += 1
