"""After every exchange: the new model's checkpoint, then the previous model's metrics, audit record,
reports and status, in that order.

A model's metrics arrive one exchange after the model itself (sites score the model they receive,
inside the masked sum of their next reply), so each checkpoint is saved at once with an open card
(who trained it, ε per site, patients) and closed when its evaluation arrives: the card gets the
metrics, the audit log gets the round's record, the reports and ``best.*`` are updated. Round 0 is
the initial model; the run's last exchange only scores the final model.

The checkpoint is written first and the audit record last, so after a crash the resumed run finds
either an open card (the next exchange scores that model) or a closed card without its record (it
appends the record from the card): no round is lost from the log and none is recorded twice.
Everything the reports show is rebuilt from the closed cards, so a resumed run's curves cover all
rounds.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import asdict
from datetime import datetime, timezone

import numpy as np

from server.audit import AuditLog, verify
from server.reports import round_line, write_reports
from server.round_metrics import SiteRound
from server.run_folder import RunFolder
from server.server_config import ServerConfig
from shared.checkpoints import Checkpoint, load_checkpoint, save_checkpoint, update_card
from shared.metrics import to_jsonable
from shared.refusals import refusal_text

log = logging.getLogger("fedpath.server")

CARD_FORMAT = "fedpath-model-card/2"


CURVES_EVERY_S = 30.0
"""curves.png is redrawn at most this often, and always for the final model: drawing it was 1.27 s of the
1.48 s a round's records cost the ServerApp between rounds (mean over 40 rounds, this machine, idle), and
grows with the rounds. metrics.json and metrics.csv are written every round; the dashboard draws live
curves from them."""


class RunRecorder:
    """Everything a run leaves in its folder, written as the rounds close: a checkpoint and model card per
    round, ``metrics.json``, ``status.json`` and the audit log; and where a resumed run starts (``resume``).

    Args:
        folder: the run folder.
        config: the consortium's server.yaml, loaded.
        names: the model's tensor names, in the wire order.
        reproducible_noise: recorded in the model cards (a simulation asked for seeded noise).
    """

    def __init__(self, folder: RunFolder, config: ServerConfig, names: list[str],
                 reproducible_noise: bool = False) -> None:
        self.folder, self.config, self.names = folder, config, names
        self.reproducible_noise = reproducible_noise
        self.audit = AuditLog(folder.audit_log)
        self.rounds: list[dict] = []  # one entry per closed (scored) model, from the cards
        self.site_privacy: dict[str, dict] = {}  # site -> latest disclosed {epsilon, delta}
        self.refusals: dict[str, dict] = {}  # site -> {round, code, reason, ...} of its latest refusal
        self.best: float | None = None  # best_metric of the best round so far
        self.best_round: int | None = None
        self.latest: Checkpoint | None = None
        self._curves_at: float | None = None  # when curves.png was last drawn (time.monotonic)

    @property
    def latest_closed(self) -> bool:
        """Whether the latest model already has its metrics (then nothing is left to score)."""
        return self.latest is not None and self.latest.card.get("closed", True)

    def resume(self) -> Checkpoint | None:
        """Reload what earlier processes of this run completed; the latest checkpoint, if any."""
        if self.folder.audit_log.exists():
            verify(self.folder.audit_log)
        checkpoints = [load_checkpoint(card.with_suffix(".npz"))
                       for card in sorted((self.folder.path / "checkpoints").glob("round-*.json"))]
        audited = {record.get("round") for record in self.audit.records() if record.get("event") == "round"}
        for checkpoint in checkpoints:
            card = checkpoint.card
            self.site_privacy, self.refusals = dict(card.get("privacy", {})), dict(card.get("refusals", {}))
            if not card.get("closed", True):
                continue
            self._absorb(card)
            if checkpoint.round not in audited:  # crashed between closing the card and the audit record
                log.warning("round %d: closed model card without audit record; appending it from the card",
                            checkpoint.round)
                self.audit.append(_audit_record(card))
        self.latest = checkpoints[-1] if checkpoints else None
        if self.rounds:
            write_reports(self.folder.path, self.rounds)
        return self.latest

    def note_waiting(self, waiting: str | None) -> None:
        """What the run waits for before a round (shown by `fedpath-server status`); None: nothing."""
        self.folder.write_status(waiting=waiting)

    def save_model(self, round_: int, arrays: list[np.ndarray], sites: dict[str, SiteRound],
                   timing: dict[str, float] | None = None, patients: float = 0.0) -> None:
        """Checkpoint the model that round ``round_`` produced, with an open card (metrics to come)."""
        for name, site in sites.items():
            if not math.isnan(site.value("epsilon")):
                self.site_privacy[name] = {"epsilon": site.value("epsilon"), "delta": site.value("delta")}
            if site.refused:
                self.refusals[name] = {"round": round_, "code": site.refused, "reason": refusal_text(site.refused),
                                       "epsilon_spent": _number(site.value("epsilon")),
                                       "would_spend": _number(site.value("would_spend")),
                                       "budget_epsilon": _number(site.value("budget_epsilon"))}
        run_info = self.folder.run_info()
        trained = sorted(name for name, site in sites.items() if site.trained)
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
                               "required": self.config.privacy.required,
                               "evaluation_share": self.config.privacy.evaluation_share,
                               # the sites' noise was planned for total_rounds + spare_rounds rounds
                               "spare_rounds": self.config.federation.spare_rounds},
            # Simulations only: the sites' DP noise was seeded from the plan, so it can be replayed.
            "reproducible_noise": self.reproducible_noise,
            "secure_aggregation": self.config.secure_aggregation.enabled,
            "sites_this_round": trained,
            "sites_all": sorted({*self._all_sites(), *trained}),
            "privacy": self.site_privacy,
            "refusals": self.refusals,
            "rejected_updates": {name: site.rejected for name, site in sorted(sites.items()) if site.rejected},
            "metrics": {"round": round_, "global": {"examples": patients},
                        "sites": {name: site.as_entry() for name, site in sorted(sites.items())},
                        "timing": timing or {}},
            "closed": False,
        })
        named = OrderedDict(zip(self.names, arrays, strict=True))
        path = save_checkpoint(self.folder.path, round_, named, card, best=False)
        self.latest = load_checkpoint(path)
        self.folder.write_status(state="running", round=round_, total_rounds=run_info["total_rounds"],
                                 sites=self._site_status(card), best_round=self.best_round)

    def close_model(self, round_: int, evaluation: dict[str, float] | None) -> dict | None:
        """Complete model ``round_``'s card with its evaluation (None: not scored this time), append its audit
        record, refresh reports and status; the round's metrics entry (None if already closed)."""
        if self.latest is None or self.latest.round != round_ or self.latest.card.get("closed", True):
            return None  # scored again after a resume: the first scoring stands
        card = self.latest.card
        entry = card["metrics"]
        entry["global"] = {**entry["global"], **(evaluation or {}), "evaluated": evaluation is not None}
        score = (evaluation or {}).get(self.config.federation.best_metric)
        is_best = score is not None and not math.isnan(score) and (self.best is None or score > self.best)
        card = update_card(self.folder.path, round_, {"metrics": entry, "closed": True,
                                                      "audit_prev_hash": self.audit.last_hash()}, best=is_best)
        record = self.audit.append(_audit_record(card))
        self.latest = load_checkpoint(self.latest.path)
        self._absorb(card)
        # The figure is drawn between rounds, on the round's critical path: at most every CURVES_EVERY_S,
        # and always for the run's final model.
        draw = (round_ >= self.folder.run_info()["total_rounds"] or self._curves_at is None
                or time.monotonic() - self._curves_at >= CURVES_EVERY_S)
        write_reports(self.folder.path, self.rounds, curves=draw)
        if draw:
            self._curves_at = time.monotonic()
        self.folder.write_status(state="running", evaluated_round=round_, audit_last_hash=record["hash"],
                                 best_round=self.best_round)
        line = round_line(entry)
        log.info("%s", line)
        print(line, flush=True)
        return entry

    def _absorb(self, card: dict) -> None:
        self.rounds = [r for r in self.rounds if r["round"] != card["round"]] + [card["metrics"]]
        score = card["metrics"]["global"].get(self.config.federation.best_metric)
        if score is not None and (self.best is None or score > self.best):
            self.best, self.best_round = score, card["round"]

    def _all_sites(self) -> set[str]:
        return {name for entry in self.rounds for name, site in entry["sites"].items() if site.get("trained")}

    def _site_status(self, card: dict) -> dict:
        names = sorted({*self.site_privacy, *self.refusals, *card["metrics"]["sites"]})
        last = card["metrics"]["sites"]
        return {name: {"epsilon": self.site_privacy.get(name, {}).get("epsilon"),
                       "delta": self.site_privacy.get(name, {}).get("delta"),
                       "in_last_round": bool(last.get(name, {}).get("trained")),
                       "refusal": self.refusals.get(name)} for name in names}


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def round_refusals(card: dict) -> dict[str, dict]:
    """The refusals of a model card's own round (the card carries every site's latest one)."""
    return {name: r for name, r in card.get("refusals", {}).items() if r["round"] == card["round"]}


def round_sites(card: dict) -> set[str]:
    """The sites that took part in a model card's round: those that trained it and those that refused it."""
    return set(card.get("sites_this_round", [])) | set(round_refusals(card))


def _audit_record(card: dict) -> dict:
    return {"event": "round", "round": card["round"], "model_sha256": card["checkpoint_sha256"],
            "sites": card["sites_this_round"], "privacy": card["privacy"],
            "refusals": round_refusals(card),
            "rejected_updates": card.get("rejected_updates", {}),
            "metrics": card["metrics"]["global"], "config_sha256": card["config_sha256"]}
