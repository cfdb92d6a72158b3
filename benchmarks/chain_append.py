"""What one more record costs in a hash-chained log that has grown for years (``shared/hash_chain.py``).

A site's task runner writes an egress record for every message that leaves the site (five per
SecAgg+ round, plus its starts and stops), into one log that is never rotated: the data-protection
officer's record must stay whole. Up to 2026-12-05 every append re-read and re-verified the whole
file; since then a log object reads it once and later appends read back only the last line.

For logs of ``SIZES`` records shaped like a SecAgg+ unmask reply (about 550 bytes each, as the
runner writes them), written as a valid chain beforehand, the benchmark times appends through the
product's :class:`client.egress_log.EgressLog` (record, fsync, head file) two ways in the same run:

- ``cold``: a new ``EgressLog`` per append, which reads and verifies the whole file, as every
  append did before (and as the first append after a restart still does): the baseline;
- ``warm``: the task runner's way, one ``EgressLog`` across appends.

Keys, per size: ``cold_append_ms`` and ``warm_append_ms`` (medians), ``speedup`` (cold / warm) and
``verify_s`` (``fedpath-site egress verify``'s full check). ``warm_growth``: the warm append at the
largest size over the smallest, **goal <= 2** (an append's cost does not grow with the log; can
fail). Every log is verified whole at the end, so a fast append that broke the chain fails the run.

Run: ``python -m benchmarks chain_append [--quick]`` (quick: 1,000 and 10,000 records).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from client.egress_log import EGRESS_FILE, HEAD_FILE, EgressLog
from shared.atomic_files import atomic_write_json
from shared.hash_chain import GENESIS_HASH, canonical_json, record_hash

SIZES, QUICK_SIZES = (1_000, 10_000, 100_000), (1_000, 10_000)
APPENDS = 20
COLD_APPENDS = {1_000: 20, 10_000: 10, 100_000: 5}
WARM_GROWTH_GOAL = 2.0


def _record(index: int) -> dict:
    """A SecAgg+ unmask reply as the egress log describes it (no values, only structure)."""
    return {"bundle": "c" * 64, "event": "reply", "node": 5, "outcome": "sent", "round": str(index // 5),
            "run": 1, "stage": "unmask", "type": "train",
            "content": {"arrays": {}, "metrics": {"x": {"num_examples": 1}},
                        "configs": {"secaggplus_configs": {"node_id_list": {"list": 3, "of": "int"},
                                                           "shares": {"bytes": 300, "list": 3, "of": "bytes"}}}}}


def _grown_log(state_dir: Path, size: int) -> None:
    """A valid chain of ``size`` records and its head file, written at once (as years of appends would leave it)."""
    previous, lines = GENESIS_HASH, []
    for index in range(size):
        record = {"index": index, "time": "2026-12-05T00:00:00+00:00", **_record(index), "prev_hash": previous}
        record["hash"] = previous = record_hash(record)
        lines.append(canonical_json(record))
    (state_dir / EGRESS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    atomic_write_json(state_dir / HEAD_FILE, {"records": size, "last_hash": previous, "time": record["time"]})


def _median_ms(append, count: int) -> float:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        append()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 3)


def _measure(size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp)
        _grown_log(state_dir, size)
        index = iter(range(size, size + 10_000))
        cold = _median_ms(lambda: EgressLog(state_dir).append(_record(next(index))), COLD_APPENDS[size])
        warm_log = EgressLog(state_dir)
        warm_log.open_for_writing()  # what the runner does when it starts: the one full read
        warm = _median_ms(lambda: warm_log.append(_record(next(index))), APPENDS)
        start = time.perf_counter()
        records = EgressLog(state_dir).verify()
        verify_s = time.perf_counter() - start
        appended = COLD_APPENDS[size] + APPENDS
        if len(records) != size + appended:
            raise RuntimeError(f"{len(records)} records after {appended} appends to {size}")
    return {"records": size, "line_bytes": len(canonical_json(records[-1])), "cold_append_ms": cold,
            "warm_append_ms": warm, "speedup": round(cold / warm, 2), "verify_s": round(verify_s, 3)}


def run(quick: bool = False) -> dict:
    rows = []
    for size in QUICK_SIZES if quick else SIZES:
        row = _measure(size)
        rows.append(row)
        print(f"{size:>7} records: cold {row['cold_append_ms']:8.2f} ms, warm {row['warm_append_ms']:6.2f} ms "
              f"({row['speedup']}x), verify {row['verify_s']} s", flush=True)
    growth = rows[-1]["warm_append_ms"] / rows[0]["warm_append_ms"]
    return {"sizes": rows, "appends": APPENDS, "cold_appends": COLD_APPENDS,
            "warm_growth": round(growth, 2), "warm_growth_goal": WARM_GROWTH_GOAL,
            "warm_growth_met": growth <= WARM_GROWTH_GOAL,
            "method": "medians; cold = a new EgressLog per append (full read and verify, the code before); "
                      "warm = one EgressLog, as the task runner keeps it; each append fsyncs the log and the head file"}
