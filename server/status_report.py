"""`fedpath-server status`: what an admin checks first: which sites are online, which runs exist,
how far each got, how much privacy each site has spent, and why a site sat a round out."""

from __future__ import annotations

from pathlib import Path

from server.run_folder import RunFolder
from server.server_config import ServerConfig
from server.site_registry import SiteRegistry
from server.superlink import FlowerControl, FlowerError, StatePaths


def status_report(config: ServerConfig, control: FlowerControl) -> tuple[str, bool]:
    """The report, and whether the SuperLink answered (`fedpath-server status` exits 1 when not, for
    the scripts that watch it)."""
    registry = SiteRegistry(StatePaths(config).registry)
    lines: list[str] = []
    flower_runs: dict[int, dict] = {}
    reachable = True
    try:
        nodes = [n for n in control.nodes() if n.get("status") == "online"]
        flower_runs = {int(r["run-id"]): r for r in control.runs()}
        lines.append(f"SuperLink {config.superlink.loopback_address} (sites' port {config.superlink.address}): "
                     f"{len(nodes)} site(s) online")
        lines += [f"  {registry.name_for(int(n['node-id']))}  online since {n.get('online-at')}" for n in nodes]
    except FlowerError as exc:
        reachable = False
        lines.append(f"SuperLink {config.superlink.loopback_address}: NOT REACHABLE; is it started "
                     f"(`fedpath-server start --config SERVER_YAML`)? Flower said: {exc}")
    results = Path(config.results_dir)
    folders = sorted(p for p in results.iterdir() if (p / "run.json").is_file()) if results.is_dir() else []
    lines.append(f"\nruns in {results}: {len(folders)}")
    for path in folders:
        folder = RunFolder.open(path)
        status, info = folder.status(), folder.run_info()
        run_ids = info.get("flower_runs", [])
        flower = flower_runs.get(run_ids[-1], {}) if run_ids else {}
        lines.append(f"  {path.name}  {status.get('state', '?'):<9} round {status.get('round', 0)}/"
                     f"{info.get('total_rounds')}  best round {status.get('best_round') or '-'}  flower run "
                     f"{run_ids[-1] if run_ids else '-'} {flower.get('status', '')}")
        if status.get("state") == "failed":
            lines.append(f"    failed: {status.get('message')}")
        elif status.get("state") == "running" and status.get("waiting"):
            lines.append(f"    waiting: {status['waiting']}")
        for name, site in sorted(status.get("sites", {}).items()):
            epsilon = site.get("epsilon")
            text = f"    {name:<28} ε {'n/a' if epsilon is None else f'{epsilon:.3f}'}"
            refusal = site.get("refusal")
            if refusal:
                text += f"  sat out round {refusal['round']}: {refusal['reason']}"
                if refusal.get("would_spend") is not None:
                    text += (f" (spent {refusal['epsilon_spent']:.3f}, the round would make it "
                             f"{refusal['would_spend']:.3f} > {refusal['budget_epsilon']:g})")
            lines.append(text)
    return "\n".join(lines), reachable
