"""Why a deleted or rolled-back privacy ledger cannot let a site spend its privacy again.

A site's ledger (``state_dir/ledgers/<federation>.json``) is the only record of the privacy it spent in
a federation, and the ledgers together are what its lifetime limit adds up. Deleted by mistake,
restored from an older backup, or copied back from another machine, a ledger would let the site plan
the same federation again from ε = 0, release its evaluation counts again, or open another federation
with room the lifetime limit no longer sees: the privacy promise would fail open, and nothing in the
ledgers themselves can tell.

The egress log (``state_dir/egress.jsonl``, ``client/egress_log.py``) is another file, hash-chained and
checked against its head file at every start of the task runner. Since 2026-12-05 it holds what the
ledgers must hold at least:

- the first ``start`` record of this version in a log (a new log, or the first start after the upgrade)
  copies how many releases (training rounds and evaluation releases) each ledger then records
  (``ledger_releases``): the baseline;
- every reply to a message for which a ledger recorded a release names that federation (``spent``).

So each federation's ledger must record at least its baseline plus its marked replies. The task runner
checks that with this guard, for every message whose round plan names a federation:

- before the ClientApp runs: if any federation's ledger records fewer releases (or, once the site
  spent in that federation, cannot be read), the message is refused (code 18), nothing runs and
  nothing is written: every federation's, since the lifetime limit adds them all up;
- after it ran: unless the named federation's ledger holds the entries it held before with new ones
  appended (compared by round id and the time each was recorded), it was replaced while the round ran
  (an older copy, into which the round may then have recorded), and the reply is withheld (code 18).

The runner also refuses (code 18) once site.yaml names another ``state_dir`` than the one it started
with: the ClientApp reads site.yaml for every message, and would plan afresh in the new folder.

What it cannot see (``docs/security.md`` §4): the ledgers and the egress log replaced together (the
whole state folder restored, or a new ``state_dir`` with the site restarted); a ledger rolled back
before a new egress log begins (its baseline is then the rolled-back ledger).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from client.privacy_ledger import federation_ledger, ledger_releases, recorded_releases

LEDGER_BEHIND = 18
"""The refusal code (``shared/refusals.py``) of a message refused or withheld by the guard."""
SPENT_KEY = "spent"
"""The egress record's key naming the federation whose ledger recorded a release for the message."""
BASELINE_KEY = "ledger_releases"
"""The start record's key holding each ledger's release count when the log's guard began."""

Releases = list[tuple[str, str]]  # (round id, time recorded), oldest first


class LedgerBehind(Exception):
    """A ledger records fewer releases than this site's egress log says it must, or was replaced."""


def _key(federation: str) -> str:
    """Federation ids that differ only in case name one file on a case-insensitive file system."""
    return federation.casefold()


class LedgerGuard:
    """Compares the site's ledgers with what its egress log says they must hold.

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
        self.new_baseline = ledger_releases(self.state_dir) if recorded is None else None
        baseline = recorded if recorded is not None else self.new_baseline
        self.sent: Counter[str] = Counter()
        self.names: dict[str, str] = {}  # the id as the ledger file names it, by key
        for federation, count in baseline.items():
            if isinstance(count, int) and not isinstance(count, bool):
                self._count(federation, count)
        for record in records:
            if record.get("event") == "reply" and isinstance(record.get(SPENT_KEY), str):
                self._count(record[SPENT_KEY], 1)

    def _count(self, federation: str, count: int) -> None:
        self.sent[_key(federation)] += count
        self.names.setdefault(_key(federation), federation)

    def start_fields(self) -> dict[str, Any]:
        """What the runner's start record must hold: the baseline, when this log has none yet."""
        return {} if self.new_baseline is None else {BASELINE_KEY: self.new_baseline}

    def owed(self, federation: str) -> int:
        """The releases the federation's ledger must record at least."""
        return self.sent[_key(federation)]

    def before(self, federation: str) -> Releases | None:
        """The releases the federation's ledger records before the ClientApp runs (None: unreadable in
        a federation this site has not spent in; the ClientApp's ledger refuses that itself, code 2).
        Raises LedgerBehind when it, or any other federation's ledger, records fewer than it must."""
        for other in sorted({_key(federation), *self.sent}):
            name = federation if other == _key(federation) else self.names[other]
            releases = self._check(name)
            if other == _key(federation):
                current = releases
        return current

    def _check(self, federation: str) -> Releases | None:
        path, owed = federation_ledger(self.state_dir, federation), self.owed(federation)
        releases = recorded_releases(path)
        if releases is None and owed:
            raise LedgerBehind(f"{path} cannot be read, and this site's egress log shows {owed} release(s) in "
                               f"federation {federation}. Restore the latest copy of the ledger (the data-protection "
                               "officer decides); until then every federation's messages are refused (code 18)")
        if releases is not None and len(releases) < owed:
            raise LedgerBehind(
                f"{path} records {len(releases)} release(s), but this site's egress log shows {owed} in federation "
                f"{federation}: the ledger was deleted or restored from an older copy, and the site would spend its "
                "privacy a second time (in it, or in another federation under the lifetime limit). Restore the "
                "latest copy of the ledger (the data-protection officer decides); until then every federation's "
                "messages are refused (code 18) and nothing runs")
        return releases

    def spent(self, federation: str, before: Releases | None) -> bool:
        """Whether the ClientApp's run recorded a release in the federation's ledger. Raises LedgerBehind
        unless the ledger holds the entries it held before with new ones appended."""
        path = federation_ledger(self.state_dir, federation)
        after = recorded_releases(path)
        if before is None:  # unreadable before, nothing owed: counted if the ledger now holds releases
            return bool(after)
        if after is None or after[:len(before)] != before:
            raise LedgerBehind(f"{path} is not the ledger the round began with (it held {len(before)} release(s), "
                               f"now {'none readable' if after is None else len(after)}, not the same first ones): "
                               "it was replaced while the round ran; the reply is withheld (code 18)")
        return len(after) > len(before)

    def note_sent(self, federation: str) -> None:
        """Count a reply of ``federation`` that the egress log now records with its ``spent`` mark."""
        self._count(federation, 1)
