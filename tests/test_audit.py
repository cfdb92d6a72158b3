"""server.audit: the chain survives restarts, and every kind of tampering is caught at its line."""

import json
import math

import pytest

from server.audit import GENESIS_HASH, AuditError, AuditLog, record_hash, verify


def _round_record(rnd: int) -> dict:
    return {"event": "round", "round": rnd, "sites": ["a", "b"], "model_sha256": f"{rnd:064x}",
            "epsilon": {"a": 0.5 * rnd, "b": 0.4 * rnd}, "metrics": {"auc": 0.7, "note": "ünïcode"}}


def _log_of(path, count: int) -> list[dict]:
    log = AuditLog(path)
    return [log.append(_round_record(rnd)) for rnd in range(count)]


def _lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _write_lines(path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_append_adds_chain_fields(tmp_path):
    first, second = _log_of(tmp_path / "audit.jsonl", 2)
    assert (first["index"], second["index"]) == (0, 1)
    assert first["prev_hash"] == GENESIS_HASH
    assert second["prev_hash"] == first["hash"]
    assert first["hash"] == record_hash(first) and len(first["hash"]) == 64
    assert first["time"].endswith("+00:00") and "." not in first["time"]
    assert second["epsilon"] == {"a": 0.5, "b": 0.4} and second["metrics"]["note"] == "ünïcode"
    stored = [json.loads(line) for line in _lines(tmp_path / "audit.jsonl")]
    assert stored == [first, second]


def test_chain_continues_across_reopened_log(tmp_path):
    path = tmp_path / "audit.jsonl"
    written = _log_of(path, 2)
    reopened = AuditLog(path)  # a new server process
    assert reopened.last_hash() == written[-1]["hash"]
    third = reopened.append({"event": "resume"})
    assert third["index"] == 2 and third["prev_hash"] == written[-1]["hash"]
    assert verify(path, expected_last_hash=third["hash"]) == 3
    assert AuditLog(path).records() == [*written, third]


def test_empty_and_missing_logs(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    assert log.records() == [] and log.last_hash() is None
    with pytest.raises(AuditError, match="does not exist"):
        verify(tmp_path / "audit.jsonl")
    (tmp_path / "audit.jsonl").touch()
    assert verify(tmp_path / "audit.jsonl") == 0
    with pytest.raises(AuditError, match="truncated.*it is empty"):
        verify(tmp_path / "audit.jsonl", expected_last_hash="ab" * 32)


def test_nan_is_stored_as_null(tmp_path):
    path = tmp_path / "audit.jsonl"
    record = AuditLog(path).append({"metrics": {"auc": math.nan, "loss": float("inf"), "accuracy": 0.5}})
    assert record["metrics"] == {"auc": None, "loss": None, "accuracy": 0.5}
    line = _lines(path)[0]
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line)["metrics"]["auc"] is None
    assert verify(path) == 1


def test_records_must_not_set_chain_fields(tmp_path):
    with pytest.raises(ValueError, match="hash"):
        AuditLog(tmp_path / "audit.jsonl").append({"hash": "x"})


def test_edited_field_in_middle_line_is_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    _log_of(path, 5)
    lines = _lines(path)
    edited = json.loads(lines[2])
    edited["epsilon"]["a"] = 0.01  # a site's privacy spend made to look smaller
    lines[2] = json.dumps(edited)
    _write_lines(path, lines)
    with pytest.raises(AuditError, match=r"line 3: the record was edited"):
        verify(path)


def test_deleted_line_is_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    _log_of(path, 5)
    lines = _lines(path)
    del lines[1]
    _write_lines(path, lines)
    with pytest.raises(AuditError, match=r"line 2: index gap, expected record 1 but found record 2"):
        verify(path)


def test_deleted_first_line_is_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    _log_of(path, 3)
    _write_lines(path, _lines(path)[1:])
    with pytest.raises(AuditError, match=r"line 1: index gap, expected record 0"):
        verify(path)


def test_swapped_lines_are_detected(tmp_path):
    path = tmp_path / "audit.jsonl"
    _log_of(path, 5)
    lines = _lines(path)
    lines[2], lines[3] = lines[3], lines[2]
    _write_lines(path, lines)
    with pytest.raises(AuditError, match=r"line 3: index gap"):
        verify(path)


def test_rewritten_record_with_recomputed_hash_breaks_the_next_link(tmp_path):
    path = tmp_path / "audit.jsonl"
    _log_of(path, 4)
    lines = _lines(path)
    forged = json.loads(lines[1])
    forged["sites"] = ["a"]
    forged["hash"] = record_hash(forged)
    lines[1] = json.dumps(forged)
    _write_lines(path, lines)
    with pytest.raises(AuditError, match=r"line 3: prev_hash .* does not match line 2"):
        verify(path)


def test_truncated_tail_is_detected_with_expected_last_hash(tmp_path):
    path = tmp_path / "audit.jsonl"
    written = _log_of(path, 5)
    _write_lines(path, _lines(path)[:3])
    assert verify(path) == 3  # the remaining chain alone is valid ...
    with pytest.raises(AuditError, match=r"truncated.*last record \(line 3\)"):
        verify(path, expected_last_hash=written[-1]["hash"])  # ... but not the checkpoint's


def test_records_after_the_checkpointed_hash_are_reported(tmp_path):
    path = tmp_path / "audit.jsonl"
    written = _log_of(path, 4)
    with pytest.raises(AuditError, match=r"ends the log at line 2, but 2 more record\(s\) follow"):
        verify(path, expected_last_hash=written[1]["hash"])


def test_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "audit.jsonl"
    _log_of(path, 3)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"index": 3, "ti')  # a write cut short
    with pytest.raises(AuditError, match=r"line 4 is not valid JSON \(the last line is incomplete"):
        verify(path)


def test_append_refuses_a_broken_log(tmp_path):
    path = tmp_path / "audit.jsonl"
    _log_of(path, 3)
    lines = _lines(path)
    del lines[1]
    _write_lines(path, lines)
    before = path.read_bytes()
    with pytest.raises(AuditError, match="line 2"):
        AuditLog(path).append({"event": "round"})
    assert path.read_bytes() == before


def test_append_after_a_stripped_final_newline_starts_a_new_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    _log_of(path, 2)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    third = AuditLog(path).append({"event": "resume"})
    assert len(_lines(path)) == 3
    assert verify(path, expected_last_hash=third["hash"]) == 3


def test_a_warm_log_reads_back_only_its_last_line_and_notices_every_change_to_it(tmp_path, monkeypatch):
    """After its first full read, an append of the same log object chains onto the last line alone (a site's
    egress log grows for years); any change to the file's end sends it back to reading everything."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    written = [log.append(_round_record(rnd)) for rnd in range(3)]
    full_reads = []
    read_chain = AuditLog._read_chain
    monkeypatch.setattr(AuditLog, "_read_chain", lambda self: full_reads.append(1) or read_chain(self))
    fourth = log.append(_round_record(3))
    assert full_reads == [] and fourth["index"] == 3 and fourth["prev_hash"] == written[-1]["hash"]
    assert log.last_hash() == fourth["hash"] and full_reads == []

    # Someone else appends a record with a correct chain: the size changed, so the whole file is read again.
    other = AuditLog(path).append({"event": "other"})
    fifth = log.append(_round_record(4))
    assert len(full_reads) == 2 and fifth["prev_hash"] == other["hash"] and fifth["index"] == 5

    # The last line rewritten in place, same size: its hash no longer matches, the full read names it.
    lines = _lines(path)
    lines[-1] = lines[-1].replace('"round":4', '"round":7')
    _write_lines(path, lines)
    before = path.read_bytes()
    with pytest.raises(AuditError, match="line 6: the record was edited"):
        log.append({"event": "round"})
    assert path.read_bytes() == before

    # The file replaced by a shorter, consistent history (a new file, another inode): not chained onto, since it
    # no longer holds the record this writer wrote last; a new writer (a restart) would start from it.
    restarted = tmp_path / "restarted.jsonl"
    AuditLog(restarted).append({"event": "first"})
    restarted.replace(path)
    with pytest.raises(AuditError, match="no longer holds, at line 6, the record this process wrote or read last"):
        log.append({"event": "after"})
    assert len(_lines(path)) == 1


def test_an_edit_before_the_last_line_in_place_and_of_the_same_size_is_caught_by_the_warm_append(tmp_path):
    """An earlier line edited in place to the same size keeps the file's inode and size, but not its change
    time: the warm append reads the whole file again and refuses the broken chain (a site's runner then lets
    only a bare code leave), and nothing is appended."""
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for rnd in range(3):
        log.append(_round_record(rnd))
    lines = _lines(path)
    lines[1] = lines[1].replace('"round":1', '"round":9')
    with open(path, "r+b") as handle:  # in place: same inode and size
        handle.write("".join(line + "\n" for line in lines).encode("utf-8"))
    before = path.read_bytes()
    with pytest.raises(AuditError, match="line 2: the record was edited"):
        log.append(_round_record(3))
    assert path.read_bytes() == before
