"""`fedpath-site status`: what a hospital's IT and data-protection officer check first at their own site:
every federation it took part in, the privacy each spent against its budget, the lifetime total, and
the site's own numbers of the last rounds (which never left it).
"""

from __future__ import annotations

import json

from client.egress_log import EgressLog
from client.ledger_guard import LedgerGuard
from client.privacy_ledger import (
    LedgerError,
    PrivacyBudget,
    PrivacyLedger,
    federation_ledger,
    recorded_releases,
)
from client.site_config import SiteConfig
from client.site_rounds import federations, read_rounds
from shared.hash_chain import ChainError
from shared.signed_secagg import Roster, RosterError


def status_report(config: SiteConfig, last: int = 3) -> str:
    """The site's federations, newest last, each with its ledger and its last ``last`` round records."""
    try:  # what each ledger must hold (client/ledger_guard.py); a broken log is `egress verify`'s to report
        guard = LedgerGuard(config.state_dir, EgressLog(config.state_dir).chain.records())
    except ChainError:
        guard = None
    # a deleted ledger's federation is still listed
    names = sorted(set(federations(config)) | set(guard.names.values() if guard is not None else ()))
    disclosed = ", ".join(config.disclose) or "nothing"
    lines = [f"{config.name}: {len(names)} federation(s); disclosed per round: {disclosed}"]
    lifetime_ledger = None
    for name in names:
        path = federation_ledger(config.state_dir, name)
        lines.append(f"\n{name}")
        if path.is_file():
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
                budget = PrivacyBudget(**document["budget"])
                ledger = PrivacyLedger(path, budget, lifetime_epsilon=config.privacy.lifetime_epsilon,
                                       lifetime_delta=config.privacy.delta)
                lifetime_ledger = ledger
                plan = ledger.release_plan
                kinds = [entry.get("kind", "training") for entry in document["rounds"]]
                lines.append(f"  ε spent {ledger.recorded_epsilon():.3f} of {budget.epsilon:g} (δ {budget.delta:g}, "
                             f"{budget.accountant}); {kinds.count('training')} training round(s), "
                             f"{kinds.count('evaluation')} evaluation release(s)")
                if plan is not None:
                    lines.append(f"  plan: {plan.planned_rounds} rounds, σ {plan.noise_multiplier:.3f}, sample rate "
                                 f"{plan.sample_rate:.4g}, {plan.steps_per_round} steps per round"
                                 + (f"; {plan.evaluations} evaluations at σ {plan.evaluation_noise:.3f} "
                                    f"({plan.evaluation_share:.0%} of ε)" if plan.evaluations else ""))
            except (LedgerError, OSError, ValueError, KeyError, TypeError) as exc:
                lines.append(f"  ledger {path}: UNREADABLE ({exc}); restore it from a backup")
        releases = recorded_releases(path)
        owed = guard.owed(name) if guard is not None else 0
        if releases is not None and len(releases) < owed:
            lines.append(f"  LEDGER BEHIND: {path} records {len(releases)} release(s), the egress log shows {owed}: "
                         "it was deleted or restored from an older copy. Every federation's messages are refused "
                         "(code 18) until the latest copy is restored")
        for record in (read_rounds(config, name)[-last:] if last else []):
            lines.append("  " + _record_line(record))
    lines += _roster_lines(config)
    if config.privacy.lifetime_epsilon is not None:
        spent = lifetime_ledger.lifetime_spent() if lifetime_ledger is not None else 0.0
        lines.append(f"\nlifetime ε {spent:.3f} of {config.privacy.lifetime_epsilon:g} over all federations "
                     f"(recorded plus what their plans still reserve; δ {config.privacy.delta:g})")
    return "\n".join(lines)


def _roster_lines(config: SiteConfig) -> list[str]:
    """The members whose signatures this site accepts in SecAgg+ rounds, for the data-protection officer to
    compare with the consortium agreement (fingerprints as `ssh-keygen -lf` prints them)."""
    if config.federation.roster is None:
        return ["\nno consortium roster (federation.roster): in SecAgg+ rounds the other sites' keys are taken on "
                "the server's word"]
    try:
        roster = Roster.load(config.federation.roster)
    except RosterError as exc:
        return [f"\nconsortium roster UNUSABLE: {exc}"]
    return [f"\nconsortium roster {roster.path} ({len(roster.members)} members):",
            *(f"  {line}" for line in roster.fingerprints())]


def _record_line(record: dict) -> str:
    parts = [f"round {record.get('round')}"]
    if record.get("refused"):
        return f"round {record.get('round')}: sat out, code {record['refused']}: {record.get('reason', '')}"
    if "patients" in record:
        parts.append(f"trained on {record['patients']} patients, loss {record.get('train_loss', float('nan')):.4f}")
    val = record.get("val")
    if val:
        parts.append(f"received model on {val.get('patients')} validation patients: accuracy "
                     f"{val.get('accuracy', float('nan')):.3f}, AUC {_fmt(val.get('auc'))}")
    if record.get("epsilon") is not None:
        parts.append(f"ε {record['epsilon']:.3f}")
    return "; ".join(parts)


def _fmt(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"
