"""`fedpath-server model-info CHECKPOINT`: what a checkpoint is, from its model card, once verified.

The checkpoint is loaded exactly as a resumed run or a site's `predict` loads it: its bytes must
match the card's sha256 and its arrays the card's parameter list, or it is refused. Then the card
says which model variant it is, how it was trained, in how many rounds, by which sites at what
privacy cost, how well it did, and where it sits in the run's audit log. When the checkpoint is
still in its run folder, that log is verified too and the round's own record is named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.audit import AuditLog
from shared.checkpoints import CHECKPOINT_DIR, load_checkpoint

REPLAYABLE = "; REPRODUCIBLE (replayable) DP NOISE: a simulation, not a private deployment"
METRICS = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "val_patients", "examples")
"""The federation's numbers of a checkpoint: read by the sites from their noisy evaluation counts (masked sum)."""


def model_info(path: Path) -> dict[str, Any]:
    """The card's answers to an auditor's questions (CheckpointError when the checkpoint does not match it)."""
    checkpoint = load_checkpoint(Path(path))
    card = checkpoint.card
    return {
        "checkpoint": str(path),
        "checkpoint_sha256": card["checkpoint_sha256"],
        "verified": True,
        "consortium": card.get("consortium"),
        "federation_id": card.get("federation_id"),
        "created": card.get("created"),
        "model": card.get("model"),
        "trunk_sha256": card.get("trunk_sha256"),
        "classes": card.get("classes"),
        "positive_class": card.get("positive_class"),
        "sequence_length": card.get("sequence_length"),
        "strategy": card.get("strategy"),
        "training": card.get("training"),
        "round": checkpoint.round,
        "total_rounds": card.get("total_rounds"),
        "sites": card.get("sites_all", []),
        "sites_last_round": card.get("sites_this_round", []),
        "privacy_target": card.get("privacy_target"),
        "reproducible_noise": card.get("reproducible_noise", False),
        "secure_aggregation": card.get("secure_aggregation"),
        "privacy": card.get("privacy", {}),
        "refusals": card.get("refusals", {}),
        "metrics": card.get("metrics", {}).get("global", {}),
        "audit": _audit(Path(path), card),
    }


def _audit(path: Path, card: dict) -> dict[str, Any]:
    """The card's link into the audit log, and the log's own view when the run folder is there."""
    found: dict[str, Any] = {"prev_hash": card.get("audit_prev_hash"), "log": None}
    log = path.resolve().parent.parent / "audit.jsonl"
    if path.resolve().parent.name != CHECKPOINT_DIR or not log.is_file():
        return found
    records = AuditLog(log).records()  # verifies the whole chain; AuditError when it is broken
    rounds = [r for r in records if r.get("event") == "round" and r.get("model_sha256") == card["checkpoint_sha256"]]
    found.update(log=str(log), records=len(records), last_hash=records[-1]["hash"] if records else None,
                 record_hash=rounds[-1]["hash"] if rounds else None)
    return found


def render(info: dict[str, Any]) -> str:
    """The model card for a person: one topic per line, one line per site."""
    model = info["model"] or {}
    training = info["training"] or {}
    target = info["privacy_target"] or {}
    share = target.get("evaluation_share")
    lines = [
        f"checkpoint    {info['checkpoint']}",
        f"sha256        {info['checkpoint_sha256']} (matches the model card)",
        f"consortium    {info['consortium']}, run {info['federation_id']}, saved {info['created']}",
        "model         " + ", ".join(f"{k} {v}" for k, v in model.items() if k != "trunk_sha256"),
        f"trunk sha256  {info['trunk_sha256'] or 'not pinned (random or unrecorded trunk)'}",
        f"classes       {', '.join(info['classes'] or [])} (positive: {info['positive_class'] or 'the second'}); "
        f"windows of {info['sequence_length']} tiles",
        f"training      strategy {info['strategy']}" + "".join(f", {k} {v}" for k, v in training.items()),
        f"rounds        {info['round']} of {info['total_rounds']}",
        f"sites         {', '.join(info['sites']) or 'none'} "
        f"(last round: {', '.join(info['sites_last_round']) or 'none'})",
        f"privacy       target ε {target.get('epsilon')}, δ {target.get('delta')}"
        f"{' (required)' if target.get('required') else ''}"
        f"{'' if share is None else f', evaluation share {share}'}"
        f"{f', noise planned for {spare} spare round(s)' if (spare := target.get('spare_rounds')) else ''}"
        f"{'; SecAgg+' if info['secure_aggregation'] else ''}"
        f"{REPLAYABLE if info['reproducible_noise'] else ''}",
    ]
    for site in sorted(set(info["sites"]) | set(info["privacy"])):
        spent = info["privacy"].get(site, {})
        refusal = info["refusals"].get(site)
        lines.append(f"  {site:<12} ε {_number(spent.get('epsilon'))}  δ {spent.get('delta')}"
                     + (f"  (sat out round {refusal['round']}: {refusal['reason']})" if refusal else ""))
    metrics = info["metrics"]
    reported = ", ".join(f"{k} {_number(metrics[k])}" for k in METRICS if k in metrics)
    lines.append("metrics       " + (reported or "none")
                 + ("" if metrics.get("evaluated", True) else " (not scored by the sites)"))
    audit = info["audit"]
    lines.append(f"audit         this round's record chains onto {audit['prev_hash'] or 'the start of the log'}")
    if audit["log"]:
        record = audit["record_hash"] or "none yet (interrupted save: `resume` appends it)"
        lines.append(f"              {audit['log']}: {audit['records']} records, chain intact; this checkpoint's "
                     f"record {record}; last hash {audit['last_hash']}")
    return "\n".join(lines)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
