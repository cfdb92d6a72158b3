"""The site's egress log: what a record holds (and never holds), the chain and its head file catch
every kind of tampering, and the DPO's commands."""

from __future__ import annotations

import json

import pytest
import yaml
from flwr.app import Error, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from client.cli import main as site_main
from client.egress_log import ERROR, SENT, EgressError, EgressLog, describe_reply, render
from client.egress_policy import Violation
from tests.flower_messages import (
    RUN_ID,
    SITE_NODE,
    evaluate_reply,
    fit_reply,
    secagg_reply,
    server_message,
    server_message_to,
)

MASKED = [b"\x13\x37" * 500, b"\x42" * 24]


def _masked_vector_reply() -> tuple[Message, Message]:
    message = server_message(stage=Stage.COLLECT_MASKED_VECTORS, round_=3)
    base = fit_reply(message, {"epsilon": 1.25, "refused": 0, "delta": float("nan")}, examples=17)
    base.content.array_records["fitres.parameters"].clear()  # as Flower's mod does
    return message, secagg_reply(message, {Key.MASKED_PARAMETERS: MASKED}, base)


def test_a_record_shows_structure_and_disclosed_values_never_masked_bytes():
    message, reply = _masked_vector_reply()
    record = describe_reply(message, reply, Stage.COLLECT_MASKED_VECTORS, SENT, "ab" * 32)
    assert {k: record[k] for k in ("run", "round", "node", "type", "stage", "outcome")} == {
        "run": RUN_ID, "round": "3", "node": SITE_NODE, "type": "train", "stage": "collect_masked_vectors",
        "outcome": SENT}
    content = record["content"]
    assert content["arrays"] == {"fitres.parameters": {}}
    assert content["metrics"] == {"fitres.num_examples": {"num_examples": 17}}
    assert content["configs"]["fitres.metrics"] == {"epsilon": 1.25, "refused": 0, "delta": "nan"}
    assert content["configs"]["fitres.status"] == {"code": 0, "message": "Success"}
    assert content["configs"]["secaggplus_configs"]["masked_params"] == {"list": 2, "of": "bytes", "bytes": 1024}
    line = json.dumps(record)
    assert MASKED[0].hex()[:32] not in line and "\\u0013" not in line  # the masked vector itself is not there


def test_arrays_are_described_by_dtype_shape_and_size():
    message = server_message()
    record = describe_reply(message, fit_reply(message, {"epsilon": 1.0}, arrays=True), None, SENT, None)
    (array,) = record["content"]["arrays"]["fitres.parameters"].values()
    assert array["dtype"] == "float32" and array["shape"] == [3, 2] and array["bytes"] >= 24


def test_error_replies_are_recorded_by_code_and_the_failed_rule():
    message = server_message(message_type="evaluate")
    record = describe_reply(message, Message(Error(code=1014), reply_to=message), None, "withheld", None,
                            Violation("b", "configs:evaluateres.metrics/accuracy", "key not disclosed"))
    assert record["error_code"] == 1014 and "content" not in record
    assert record["violation"] == {"rule": "b", "field": "configs:evaluateres.metrics/accuracy"}


def _log_of(state, count: int = 4) -> EgressLog:
    egress = EgressLog(state)
    egress.append({"event": "start", "version": "0.1.0", "app_digest": "c" * 64, "allowed_bundles": [],
                   "disclose": ["epsilon", "refused"], "require_secure_aggregation": True})
    for round_ in range(1, count):
        message = server_message(message_type="evaluate", round_=round_)
        egress.append(describe_reply(message, evaluate_reply(message, {"epsilon": 0.5 * round_}), None, SENT, "c" * 64))
    return egress


def _rewrite(path, change) -> None:
    lines = path.read_text().splitlines()
    change(lines)
    path.write_text("".join(line + "\n" for line in lines))


def test_chain_and_head_file(tmp_path):
    egress = _log_of(tmp_path)
    records = egress.verify()
    assert len(records) == 4
    assert json.loads(egress.head_path.read_text())["last_hash"] == records[-1]["hash"]
    assert len(egress.open_for_writing()) == 4
    assert len(egress.verify(expected_last_hash=records[1]["hash"])) == 4


@pytest.mark.parametrize("tamper, match", [
    (lambda lines: lines.__setitem__(2, lines[2].replace('"epsilon":1.0', '"epsilon":0.1')),
     r"line 3: the record was edited"),
    (lambda lines: lines.__delitem__(1), r"line 2: index gap"),
    (lambda lines: lines.insert(1, lines.pop(2)), r"line 2: index gap"),
    (lambda lines: lines.__delitem__(slice(2, None)), r"was truncated.*egress.head"),
])
def test_tampering_is_named_by_line(tmp_path, tamper, match):
    egress = _log_of(tmp_path)
    _rewrite(egress.path, tamper)
    with pytest.raises(EgressError, match=match):
        egress.verify()
    with pytest.raises(EgressError):
        egress.open_for_writing()  # and the runner refuses to chain onto it


def test_rewriting_log_and_head_is_caught_with_a_hash_noted_earlier(tmp_path):
    egress = _log_of(tmp_path)
    noted = egress.verify()[-1]["hash"]
    for path in (egress.path, egress.head_path):
        path.unlink()
    _log_of(tmp_path, 2)  # a fresh, shorter but self-consistent history
    egress.verify()
    with pytest.raises(EgressError, match="no record has the hash"):
        egress.verify(expected_last_hash=noted)


def test_head_one_record_behind_is_a_power_cut_and_is_repaired(tmp_path):
    egress = _log_of(tmp_path)
    behind = egress.verify()[-2]
    egress.head_path.write_text(json.dumps({"records": 3, "last_hash": behind["hash"]}))
    with pytest.raises(EgressError, match=r"ends the log at line 3, but 1 more record"):
        egress.verify()  # the DPO's check says so ...
    assert len(egress.open_for_writing()) == 4  # ... the runner moves the head forward, with a warning
    assert len(egress.verify()) == 4


def test_a_stop_between_the_first_record_and_its_head_is_repaired_too(tmp_path):
    """The head is written before the first record (the empty chain's hash), so a power cut right after that
    record leaves a head one behind, repaired at start, instead of a missing head only the DPO can clear."""
    egress = EgressLog(tmp_path)
    assert egress.open_for_writing() == [] and egress.verify() == []  # a runner started, nothing answered yet
    egress.chain.append({"event": "start"})  # ... and the machine lost power before the head moved
    assert len(egress.open_for_writing()) == 1
    assert json.loads(egress.head_path.read_text())["last_hash"] == egress.verify()[0]["hash"]


def test_a_site_that_never_started_is_told_where_the_log_comes_from(tmp_path):
    with pytest.raises(EgressError, match="does not exist: the site's task runner writes it when it first starts"):
        EgressLog(tmp_path).verify()


def test_missing_head_with_records_is_refused(tmp_path):
    egress = _log_of(tmp_path)
    egress.head_path.unlink()
    with pytest.raises(EgressError, match="egress.head is missing"):
        egress.open_for_writing()


def _site(tmp_path):
    (tmp_path / "manifest.csv").write_text("slide,label\n")
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"name": "h", "data": {"manifest": "manifest.csv"}}))
    return site


def test_dpo_commands(tmp_path, capsys):
    site = _site(tmp_path)
    egress = _log_of(tmp_path / "state")
    message = server_message(stage=Stage.SETUP)
    egress.append(describe_reply(message, Message(Error(code=1013), reply_to=message), Stage.SETUP, ERROR, None))
    assert site_main(["egress", "verify", "--config", str(site)]) == 0
    out = capsys.readouterr().out
    last = egress.verify()[-1]["hash"]
    assert "5 records" in out and "4 (1 error, 3 sent)" in out and last in out
    assert site_main(["egress", "show", "--config", str(site), "--last", "2"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert len(shown) == 2
    assert "run 7 round 3 evaluate: sent" in shown[0] and "epsilon=1.5" in shown[0] and "num_examples=4" in shown[0]
    assert "train/setup: error code 1013 (the site could not handle the message" in shown[1]
    with pytest.raises(SystemExit) as exited:  # --last -2 showed all but the first two
        site_main(["egress", "show", "--config", str(site), "--last", "-2"])
    assert exited.value.code == 2 and "-2: must be at least 0" in capsys.readouterr().err
    _rewrite(egress.path, lambda lines: lines.__setitem__(1, lines[1].replace('"round":"1"', '"round":"9"')))
    assert site_main(["egress", "verify", "--config", str(site)]) == 2
    assert "line 2: the record was edited" in capsys.readouterr().err
    assert site_main(["egress", "show", "--config", str(site)]) == 2  # still shows what is there, and says why
    captured = capsys.readouterr()
    assert "round 9" in captured.out and "line 2" in captured.err


def test_render_start_record(tmp_path):
    egress = _log_of(tmp_path, 1)
    assert "runner started: fedpath 0.1.0 bundle cccccccccccc" in render(egress.verify())
    egress.append({"event": "start", "version": "0.1.0", "ledger_releases": {"fed-1": 3}})
    assert render(egress.verify()[-1:]).endswith("; ledgers then: {'fed-1': 3}")  # the ledger guard's baseline


def test_a_round_id_the_server_makes_long_or_multiline_is_recorded_by_length_and_hash(tmp_path):
    """A server chooses the round id: megabytes of it per message would fill the hospital's disk through this
    log, and line breaks would make `egress show` print records that do not exist."""
    forged = "3\n#9 2026-12-04T00:00:00+00:00 run 7 round 1 train/unmask: sent" + "x" * 100_000
    message = server_message_to(SITE_NODE, RecordDict(), forged)
    record = describe_reply(message, Message(Error(code=1013), reply_to=message), "share_keys\x1b[2J", ERROR, None)
    assert record["round"].startswith("(not shown: 100063 characters, sha256 ")
    assert record["stage"].startswith("(not shown: 14 characters")
    egress = _log_of(tmp_path, 1)
    egress.append(record)
    assert egress.path.stat().st_size < 2000
    shown = render(egress.verify()).splitlines()
    assert len(shown) == 2 and "run 7 round (not shown: 100063 characters" in shown[1]
    assert describe_reply(server_message(round_=12), Message(Error(code=1013), reply_to=message), "unmask", ERROR,
                          None)["round"] == "12"  # Flower's own ids as they are
