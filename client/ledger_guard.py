"""Why a deleted or rolled-back privacy ledger cannot start a federation's budget afresh.

A site's ledger (``state_dir/ledgers/<federation>.json``) is the only record of the privacy it spent in
a federation. Deleted by mistake, restored from an older backup, or copied back from another machine,
it would let the site plan the same federation again from ε = 0 and train its full budget a second
time: the privacy promise would fail open, and nothing in the ledger itself can tell.

The egress log (``state_dir/egress.jsonl``, ``client/egress_log.py``) is another file, hash-chained and
checked against its head file at every start of the task runner. Since 2026-12-05 it holds what the
ledgers must hold at least:

- the first ``start`` record of this version in a log (a new log, or the first start after the upgrade)
  copies how many trainings each ledger then records (``ledger_trainings``): the baseline;
- every reply to a message whose run recorded a training in its federation's ledger names that
  federation (``trained``), before it leaves.

So a federation's ledger must record at least the baseline plus the marked replies. The task runner
checks that with this guard:

- before the ClientApp runs for a message whose round plan names a federation: a ledger that records
  fewer trainings (or, once the site has trained in the federation, cannot be read) is behind; the
  message is refused (code 18), nothing runs and nothing is written into the ledger;
- after it ran: unless the ledger's training records are the ones it held before with new ones
  appended, it was replaced while the round ran (an older copy, into which the round then recorded
  its training), and the reply is withheld (code 18).

What it cannot see (``docs/security.md`` §4): the ledgers and the egress log replaced together (the
whole state folder restored, or a new ``state_dir``); a ledger rolled back before a new egress log
begins (its baseline is then the rolled-back ledger).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from client.privacy_ledger import federation_ledger, ledger_trainings, recorded_trainings

LEDGER_BEHIND = 18
"""The refusal code (``shared/refusals.py``) of a message whose federation's ledger is behind."""
TRAINED_KEY = "trained"
"""The egress record's key naming the federation whose ledger recorded a training for the message."""
BASELINE_KEY = "ledger_trainings"
"""The start record's key holding each ledger's training count when the log's guard began."""

Trainings = list[tuple[str, str]]  # (round id, time recorded), oldest first


class LedgerBehind(Exception):
    """The federation's ledger records fewer trainings than this site's egress log says it must."""


class LedgerGuard:
    """Compares each federation's ledger with what the egress log says it must hold.

    Args:
        state_dir: the site's state folder (its ledgers and its egress log).
        records: the egress log's records, oldest first (``EgressLog.verify()``). Without a start
            record holding a baseline, the ledgers as they are now become it (``start_fields``).
    """

    def __init__(self, state_dir: Path, records: Iterable[dict[str, Any]]) -> None:
        self.state_dir = Path(state_dir)
        records = list(records)
        recorded = next((r[BASELINE_KEY] for r in records
                         if r.get("event") == "start" and isinstance(r.get(BASELINE_KEY), dict)), None)
        self.new_baseline = ledger_trainings(self.state_dir) if recorded is None else None
        baseline = recorded if recorded is not None else self.new_baseline
        self.sent: Counter[str] = Counter({name: count for name, count in baseline.items()
                                           if isinstance(count, int) and not isinstance(count, bool)})
        self.sent.update(record[TRAINED_KEY] for record in records
                         if record.get("event") == "reply" and isinstance(record.get(TRAINED_KEY), str))

    def start_fields(self) -> dict[str, Any]:
        """What the runner's start record must hold: the baseline, when this log has none yet."""
        return {} if self.new_baseline is None else {BASELINE_KEY: self.new_baseline}

    def before(self, federation: str) -> Trainings | None:
        """The trainings the federation's ledger records before the ClientApp runs (None: unreadable in
        a federation this site has not trained in; the ClientApp's ledger refuses that itself, code 2).
        Raises LedgerBehind when they are fewer than the egress log says, or cannot be read then."""
        path = federation_ledger(self.state_dir, federation)
        trainings, owed = recorded_trainings(path), self.sent[federation]
        if trainings is None and owed:
            raise LedgerBehind(f"{path} cannot be read, and this site's egress log shows {owed} training(s) in "
                               f"federation {federation}. Restore the latest copy of the ledger (the data-protection "
                               "officer decides); until then this federation's messages are refused (code 18)")
        if trainings is not None and len(trainings) < owed:
            raise LedgerBehind(
                f"{path} records {len(trainings)} training round(s), but this site's egress log shows {owed} in "
                f"federation {federation}: the ledger was deleted or restored from an older copy, and planning the "
                "federation again would spend its privacy a second time. Restore the latest copy of the ledger "
                "(the data-protection officer decides); until then this federation's messages are refused "
                "(code 18) and nothing runs")
        return trainings

    def trained(self, federation: str, before: Trainings | None) -> bool:
        """Whether the ClientApp's run recorded a training in the federation's ledger. Raises LedgerBehind
        unless the ledger's trainings are the ones it held before with new ones appended."""
        path = federation_ledger(self.state_dir, federation)
        after = recorded_trainings(path)
        if before is None:  # unreadable before, nothing owed: counted if the ledger now holds trainings
            return bool(after)
        if after is None or after[:len(before)] != before:
            raise LedgerBehind(f"{path} is not the ledger the round began with (it held {len(before)} training "
                               f"round(s), now {'none readable' if after is None else len(after)}, not the same "
                               "first ones): it was replaced while the round ran; the reply is withheld (code 18)")
        return len(after) > len(before)

    def note_sent(self, federation: str) -> None:
        """Count a reply of ``federation`` that the egress log now records with its ``trained`` mark."""
        self.sent[federation] += 1
