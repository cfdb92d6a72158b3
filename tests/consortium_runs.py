"""Helpers of the tests that run a real consortium: settings small enough for this machine, waits
bounded by a deadline, and what a run folder says about who trained."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import time
from pathlib import Path

import pytest
import yaml

from client.feature_cache import FeatureCache
from client.private_training import PrivateRound
from client.sequence_data import PatientSequences, load_split
from client.site_config import load_site_config
from server.run_folder import RunFolder
from server.server_config import SecureAggregationConfig
from server.site_registry import SiteRegistry
from server.superlink import StatePaths
from shared.model import SequenceHead
from shared.processes import tail
from shared.run_config import PrivacyConfig, TrainingConfig
from simulations.local_consortium import LocalConsortium

TRAINING = {"epochs": 1, "batch_size": 2, "learning_rate": 0.003}
RUN_TIMEOUT = 420  # seconds; a round takes about 30 s here


def wait_for_model(folder: RunFolder, round_: int, timeout: float = RUN_TIMEOUT) -> dict:
    """Wait until round ``round_``'s model is saved (its metrics come with the next exchange); its card."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if folder.status().get("round", 0) >= round_:
            return json.loads((folder.path / "checkpoints" / f"round-{round_:04d}.json").read_text())
        if folder.status().get("state") == "failed":
            pytest.fail(f"run failed: {folder.status().get('message')}")
        time.sleep(0.5)
    pytest.fail(f"round {round_} not done within {timeout} s; status {folder.status()}")


def site_log_size(site_yaml: Path) -> int:
    """How many bytes the site's log holds now (``wait_for_site_log(since=...)`` looks only after them)."""
    log_file = load_site_config(site_yaml).state_dir / "supernode.log"
    return log_file.stat().st_size if log_file.exists() else 0


def wait_for_site_log(site_yaml: Path, text: str, timeout: float = RUN_TIMEOUT, since: int = 0) -> int:
    """Return as soon as the site's log (``state/supernode.log``), after its first ``since`` bytes, holds
    ``text``, e.g. its task runner's "round 2 train/share_keys: running the ClientApp"; the value is the
    offset just after the text, so that a next wait (``since=``) looks only at what the site logged later.
    Looked for every 0.05 s, reading only what was added."""
    log_file = load_site_config(site_yaml).state_dir / "supernode.log"
    wanted = text.encode()
    deadline, offset = time.monotonic() + timeout, since
    while time.monotonic() < deadline:
        if log_file.exists():
            with log_file.open("rb") as handle:
                start = max(since, offset - len(wanted))  # a line split between two looks
                handle.seek(start)
                added = handle.read()
                offset = start + len(added)
            if (found := added.find(wanted)) >= 0:
                return start + found + len(wanted)
        time.sleep(0.05)
    pytest.fail(f"{site_yaml.parent.name}'s log did not say {text!r} within {timeout} s; its last lines:\n"
                f"{tail(log_file, 30)}")


def trained_sites(rounds: list[dict], round_: int) -> set[str]:
    [entry] = [e for e in rounds if e["round"] == round_]
    return {name for name, site in entry["sites"].items() if site.get("trained")}


def accept_two_site_rounds(sites: list[Path]) -> None:
    """These hospitals accept SecAgg+ rounds of two sites (a dead site leaves two)."""
    for site in sites:
        document = yaml.safe_load(site.read_text())
        document.setdefault("federation", {})["min_round_sites"] = 2
        site.write_text(yaml.safe_dump(document))


def exhaust_budget(site_yaml: Path, federation_id: str, rounds: int) -> None:
    """Give a site a ledger for this federation, planned as the site plans it, whose budget earlier
    rounds already spent."""
    config = load_site_config(site_yaml)
    train, _ = load_split(FeatureCache(config.features.cache_dir), "train")
    privacy = PrivacyConfig(epsilon=8.0, delta=1e-5, planned_rounds=rounds)
    session = PrivateRound(SequenceHead(2, "rnn", projection=8, hidden=4), PatientSequences(train, 4),
                           TrainingConfig(**TRAINING), privacy, config.state_dir / "ledgers" / f"{federation_id}.json",
                           evaluations=rounds + 1, evaluation_share=0.25,
                           settings={"weight_scale": SecureAggregationConfig().max_weight})  # the server's default
    for earlier in range(rounds):
        session.ledger.record_segment(session.plan.training_segment, f"earlier-{earlier}")
    for earlier in range(rounds + 1):
        session.ledger.record_segment(session.plan.evaluation_segment, f"earlier-{earlier}-evaluation",
                                      kind="evaluation")


def site_node(consortium: LocalConsortium, site: str) -> int:
    """The node id the consortium registered ``site`` under."""
    return int(SiteRegistry(StatePaths(consortium.config).registry).entries()[site]["node_id"])


def online_nodes(consortium: LocalConsortium) -> set[int]:
    """The node ids the SuperLink lists as online (a `flwr supernode ls`, about 1.6 s of CPU)."""
    return {int(n["node-id"]) for n in consortium.control.nodes() if n.get("status") == "online"}


def raw_request(port: int, method: str, path: str, ca: Path | None, body: bytes = b"",
                headers: dict[str, str] | None = None) -> int:
    """One raw request, the path sent exactly as given (no client-side normalisation)."""
    if ca is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    else:
        context = ssl.create_default_context(cafile=str(ca))
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    try:
        connection.request(method, path, body=body if method == "POST" else None,
                           headers={"Content-Type": "application/protobuf", **(headers or {})})
        return connection.getresponse().status
    finally:
        connection.close()


def proxy_access_log(consortium: LocalConsortium) -> list[dict]:
    """The proxy's access log, one dict per request: method, uri, status, bytes (of the request), sent (the
    answer's body), upstream ('-': not passed on), seconds (from the request to the answer)."""
    pattern = re.compile(r'"(?P<method>\S+) (?P<uri>\S+) [^"]*" (?P<status>\d+) (?P<sent>\d+) '
                         r'request_bytes=(?P<bytes>\d+) upstream=(?P<upstream>\S+) \S+ seconds=(?P<seconds>[\d.]+)')
    text = StatePaths(consortium.config).proxy.access_log.read_text()
    return [m.groupdict() for m in map(pattern.search, text.splitlines()) if m]
