"""After every round: checkpoint with model card, audit record, reports and status, in that order.

The checkpoint is written first and the audit record second, so after a crash between the two
the resumed run appends the missing record from the checkpoint's own card: no round is lost
from the log and none is recorded twice. Everything the reports show is rebuilt from the
round cards, so a resumed run's curves cover all rounds.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import asdict
from datetime import datetime, timezone

import numpy as np

from server.audit import AuditLog, verify
from shared.checkpoints import Checkpoint, load_checkpoint, save_checkpoint
from server.reports import round_line, write_reports
from server.round_metrics import SiteRound, pooled
from server.run_folder import RunFolder
from server.server_config import ServerConfig
from shared.metrics import to_jsonable
from shared.round_plan import REFUSALS

log = logging.getLogger("fedpath.server")

CARD_FORMAT = "fedpath-model-card/1"


class RunRecorder:
    def __init__(self, folder: RunFolder, config: ServerConfig, names: list[str]) -> None:
        self.folder, self.config, self.names = folder, config, names
        self.audit = AuditLog(folder.audit_log)
        self.rounds: list[dict] = []  # one entry per completed round, from the cards
        self.site_privacy: dict[str, dict] = {}  # site -> latest {epsilon, delta}
        self.refusals: dict[str, dict] = {}  # site -> {round, reason} of its latest refusal
        self.best: float | None = None  # best_metric of the best round so far
        self.best_round: int | None = None

    def resume(self) -> Checkpoint | None:
        """Reload what earlier processes of this run completed; the latest checkpoint, if any."""
        if self.folder.audit_log.exists():
            verify(self.folder.audit_log)
        checkpoints = [load_checkpoint(card.with_suffix(".npz"))
                       for card in sorted((self.folder.path / "checkpoints").glob("round-*.json"))]
        audited = {record.get("round") for record in self.audit.records() if record.get("event") == "round"}
        for checkpoint in checkpoints:
            self._absorb(checkpoint.card)
            if checkpoint.round not in audited:  # crashed between checkpoint and audit record
                log.warning("round %d: checkpoint without audit record; appending it from the model card",
                            checkpoint.round)
                self.audit.append(_audit_record(checkpoint.card))
        latest = checkpoints[-1] if checkpoints else None
        if latest is not None:
            write_reports(self.folder.path, self.rounds)
        return latest

    def finish_round(self, round_: int, arrays: list[np.ndarray], sites: dict[str, SiteRound],
                     timing: dict[str, float] | None = None) -> dict:
        entry = {"round": round_, "global": pooled(sites, self.config.classes, self.config.positive_class),
                 "sites": {name: site.as_entry() for name, site in sorted(sites.items())}, "timing": timing or {}}
        for name, site in sites.items():
            if not math.isnan(site.epsilon):
                self.site_privacy[name] = {"epsilon": site.epsilon, "delta": site.delta}
            if site.refused:
                self.refusals[name] = {"round": round_, "code": site.refused, "reason": REFUSALS[site.refused],
                                       "epsilon_spent": site.epsilon, "would_spend": site.would_spend,
                                       "budget_epsilon": site.budget_epsilon}
        run_info = self.folder.run_info()
        score = entry["global"].get(self.config.federation.best_metric)
        is_best = score is not None and not math.isnan(score) and (self.best is None or score > self.best)
        card = to_jsonable({
            "format": CARD_FORMAT,
            "consortium": self.config.name,
            "federation_id": self.folder.federation_id,
            "config_sha256": run_info["config_sha256"],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "total_rounds": run_info["total_rounds"],
            "model": self.config.model.as_dict(),
            "trunk_sha256": self.config.model.trunk_sha256,  # the trunk every site's features came from
            "classes": list(self.config.classes),
            "positive_class": self.config.positive_class,
            "sequence_length": self.config.training.sequence_length,
            "training": asdict(self.config.training),
            "strategy": self.config.strategy.name,
            "privacy_target": {"epsilon": self.config.privacy.epsilon, "delta": self.config.privacy.delta,
                               "required": self.config.privacy.required},
            "sites_this_round": sorted(n for n, s in sites.items() if s.examples > 0),
            "sites_all": sorted({*self._all_sites(), *(n for n, s in sites.items() if s.examples > 0)}),
            "privacy": self.site_privacy,
            "refusals": self.refusals,
            "rejected_updates": {name: site.rejected for name, site in sorted(sites.items()) if site.rejected},
            "metrics": entry,
            # This round's audit record chains onto this hash (its prev_hash): the card names the
            # history it came from, though it cannot hold the hash of a record that hashes the card.
            "audit_prev_hash": self.audit.last_hash(),
        })
        path = save_checkpoint(self.folder.path, round_, OrderedDict(zip(self.names, arrays)), card, best=is_best)
        card = load_checkpoint(path).card
        record = self.audit.append(_audit_record(card))
        self._absorb(card)
        write_reports(self.folder.path, self.rounds)
        self.folder.write_status(state="running", round=round_, total_rounds=card["total_rounds"],
                                 sites=self._site_status(), audit_last_hash=record["hash"],
                                 best_round=self.best_round)
        line = round_line(entry)
        log.info("%s", line)
        print(line, flush=True)
        return entry

    def _absorb(self, card: dict) -> None:
        self.rounds = [r for r in self.rounds if r["round"] != card["round"]] + [card["metrics"]]
        self.site_privacy = dict(card.get("privacy", {}))
        self.refusals = dict(card.get("refusals", {}))
        score = card["metrics"]["global"].get(self.config.federation.best_metric)
        if score is not None and (self.best is None or score > self.best):
            self.best, self.best_round = score, card["round"]

    def _all_sites(self) -> set[str]:
        return {name for entry in self.rounds for name, site in entry["sites"].items() if site.get("examples")}

    def _site_status(self) -> dict:
        names = sorted({*self.site_privacy, *self.refusals, *self._all_sites()})
        last = self.rounds[-1]["sites"] if self.rounds else {}
        return {name: {"epsilon": self.site_privacy.get(name, {}).get("epsilon"),
                       "delta": self.site_privacy.get(name, {}).get("delta"),
                       "in_last_round": bool(last.get(name, {}).get("examples")),
                       "refusal": self.refusals.get(name)} for name in names}


def _audit_record(card: dict) -> dict:
    return {"event": "round", "round": card["round"], "model_sha256": card["checkpoint_sha256"],
            "sites": card["sites_this_round"], "privacy": card["privacy"],
            "refusals": {name: r for name, r in card["refusals"].items() if r["round"] == card["round"]},
            "rejected_updates": card.get("rejected_updates", {}),
            "metrics": card["metrics"]["global"], "config_sha256": card["config_sha256"]}
