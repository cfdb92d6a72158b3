"""`fedpath-site`: the hospital IT's command. Check the slides, prepare the feature cache, train locally,
predict slides with a consortium model, join the federation, and show what left the site."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client.check import check_site
from client.prepare import prepare_site
from client.site_config import load_site_config
from shared.cli import add_command, run_cli, whole_number
from shared.metrics import format_metric


def _check(args: argparse.Namespace) -> int:
    report = check_site(load_site_config(args.config))
    print(report.render())
    return 0 if report.ok else 1


def _prepare(args: argparse.Namespace) -> int:
    summary = prepare_site(load_site_config(args.config), progress=not args.no_progress)
    print(summary.report())
    return 0 if summary.count("skipped") == 0 and not summary.problems else 1


def _train_local(args: argparse.Namespace) -> int:
    from client.train_local import train_local

    run = train_local(load_site_config(args.config), progress=not args.no_progress)
    print(f"model and metrics in {run.folder}")
    print(f"validation accuracy {format_metric(run.val_accuracy)}, "
          f"AUC {format_metric(run.record['final']['val'].get('auc'))}; "
          f"ε spent {'n/a (DP off)' if run.epsilon is None else format_metric(run.epsilon)}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from client.predict import predict

    site = load_site_config(args.config) if args.config else None
    run = predict(Path(args.model), [Path(p) for p in args.slides], Path(args.out), site=site, explain=args.explain,
                  thumbnail_size=args.thumbnail_size, heatmap_alpha=args.heatmap_alpha, progress=not args.no_progress)
    print(run.report())
    return 1 if run.failed else 0


def _start(args: argparse.Namespace) -> int:
    from client.supernode import start_supernode

    return start_supernode(load_site_config(args.config), Path(args.config), insecure=args.insecure,
                           detach=args.detach)


def _keygen(args: argparse.Namespace) -> int:
    from shared.site_keys import fingerprint, keygen, read_public_key

    config = load_site_config(args.config)
    private, public = keygen(Path(config.federation.auth_key).parent, Path(config.federation.auth_key).stem,
                             force=args.force)
    print(f"{config.name}: private key {private} (stays here, mode 0600)\n"
          f"send {public} to the consortium admin (fingerprint {fingerprint(read_public_key(public))})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from client.site_status import status_report

    print(status_report(load_site_config(args.config), last=args.last))
    return 0


def _stop(args: argparse.Namespace) -> int:
    from shared.processes import stop

    config = load_site_config(args.config)
    pid = stop(Path(config.state_dir) / "supernode.pid")
    print("no SuperNode was running" if pid is None else
          f"{config.name}: SuperNode and task runner (pid {pid}) stopped")
    return 0


def _bundle_digest(args: argparse.Namespace) -> int:
    from shared.app_bundle import installed_bundle_report

    config = load_site_config(args.config)
    print(installed_bundle_report())
    allowed = config.federation.allowed_bundles
    print(f"{config.name} also accepts (federation.allowed_bundles): "
          f"{', '.join(allowed) if allowed else 'nothing else'}")
    return 0


def _egress_verify(args: argparse.Namespace) -> int:
    from collections import Counter

    from client.egress_log import EgressLog

    config = load_site_config(args.config)
    egress = EgressLog(config.state_dir)
    records = egress.verify(args.expect_last_hash)
    outcomes = Counter(r.get("outcome") for r in records if r.get("event") == "reply")
    counts = ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items())) or "none"
    last = records[-1]["hash"] if records else "(empty log)"
    print(f"{egress.path}: chain intact, {len(records)} records, ends where {egress.head_path.name} says"
          f"{', and contains the hash noted earlier' if args.expect_last_hash else ''}\n"
          f"  replies: {sum(outcomes.values())} ({counts})"
          f"\n  last hash {last}\n"
          "  note it elsewhere; `fedpath-site egress verify --config site.yaml --expect-last-hash HASH` later "
          "shows that nothing before it was rewritten")
    return 0


def _egress_show(args: argparse.Namespace) -> int:
    import json

    from client.egress_log import EgressError, EgressLog, render

    config = load_site_config(args.config)
    egress = EgressLog(config.state_dir)
    try:
        records, problem = egress.verify(), None
    except EgressError as error:  # still show what is there: the DPO wants to see it
        problem = error
        records = []
        if egress.path.exists():
            for line in egress.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    records.append({"index": "?", "time": "?", "event": f"(unreadable line: {line[:60]!r})"})
    shown = records[-args.last:] if args.last else records
    print(render(shown) if shown else f"{egress.path}: no records")
    if problem is not None:
        print(f"fedpath-site: error: {problem}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpath-site", description=__doc__)
    commands = parser.add_subparsers(title="commands")
    check = add_command(commands, "check", _check,
                        "report unreadable or missing slides, unknown labels, slides without tissue, duplicates, "
                        "class counts and patients in more than one split; exit 1 on errors")
    check.add_argument("--config", required=True, help="the site's site.yaml")
    prepare = add_command(commands, "prepare", _prepare,
                          "tile every slide and cache its tile vectors; bad slides are reported and skipped; "
                          "exit 1 if any was skipped")
    prepare.add_argument("--config", required=True, help="the site's site.yaml")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    train = add_command(commands, "train-local", _train_local,
                        "train the head on this site's prepared features alone (the centralised baseline), "
                        "with DP as configured; writes model.pt and metrics.json")
    train.add_argument("--config", required=True, help="the site's site.yaml")
    train.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    predict = add_command(commands, "predict", _predict,
                          "classify slides with a consortium checkpoint; per slide a heatmap of which tiles drove "
                          "the prediction, the tiles as QuPath objects (GeoJSON), JSON and CSV; unreadable slides are "
                          "reported and skipped (exit 1)")
    predict.add_argument("slides", nargs="+", help="slide files or folders (searched recursively)")
    predict.add_argument("--model", required=True, help="a checkpoint .npz with its model card .json beside it")
    predict.add_argument("--out", required=True, help="folder for the results")
    predict.add_argument("--config", help="the site's site.yaml: its tiling, backbone and feature cache "
                                          "(default: default tiling, random trunk, no cache)")
    predict.add_argument("--explain", help="class whose evidence the heatmap shows (default: the predicted class)")
    predict.add_argument("--thumbnail-size", type=int, default=1024, help="longest side of the PNGs (default 1024)")
    predict.add_argument("--heatmap-alpha", type=float, metavar="0-1",
                         help="opacity of the strongest tiles over the tissue, 0 (none) to 1 (opaque; default 0.75)")
    predict.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    start = add_command(commands, "start", _start,
                        "start this hospital's SuperNode and task runner: they join the consortium's federated rounds "
                        "(TLS unless --insecure), run only this site's installed fedpath ClientApp, log what leaves in "
                        "state_dir/egress.jsonl, and keep reconnecting while the server restarts; Ctrl-C stops them")
    start.add_argument("--config", required=True, help="the site's site.yaml (federation.server, federation.ca_cert)")
    start.add_argument("--insecure", action="store_true", help="no TLS (test machines only; warns loudly)")
    start.add_argument("--detach", action="store_true", help="run in the background with a pid file")
    keys = add_command(commands, "keygen", _keygen,
                       "make this hospital's key pair for joining the consortium; the private key never leaves")
    keys.add_argument("--config", required=True, help="the site's site.yaml")
    keys.add_argument("--force", action="store_true", help="replace an existing key pair (then register it again)")
    status = add_command(commands, "status", _status,
                         "this site's federations: ε spent against each budget and the lifetime limit, the noise "
                         "plan, and the site's own numbers of the last rounds (which never leave it)")
    status.add_argument("--config", required=True, help="the site's site.yaml")
    status.add_argument("--last", type=whole_number(0), default=3,
                        help="round records shown per federation (default 3)")
    stop = add_command(commands, "stop", _stop, "stop a SuperNode (and its task runner) started with --detach")
    stop.add_argument("--config", required=True, help="the site's site.yaml")
    digest = add_command(commands, "bundle-digest", _bundle_digest,
                         "print the content digest of this site's installed fedpath app bundle: compare it with the "
                         "digest the consortium announces for a release; only bundles with this digest (or listed in "
                         "federation.allowed_bundles) run here")
    digest.add_argument("--config", required=True, help="the site's site.yaml")
    about = "the site's own log of everything that left it (state_dir/egress.jsonl)"
    egress = commands.add_parser("egress", help=about, description=about)
    egress.set_defaults(handler=lambda _args: (egress.print_help(), 2)[1])
    egress_commands = egress.add_subparsers(title="egress commands", dest="egress_command", required=True)
    verify = add_command(egress_commands, "verify", _egress_verify,
                         "check the egress log's hash chain (edits, removals, reordering, truncation against "
                         "egress.head); exit 2 naming the first broken line")
    verify.add_argument("--config", required=True, help="the site's site.yaml")
    verify.add_argument("--expect-last-hash", help="a last hash noted earlier: it must still be in the log")
    show = add_command(egress_commands, "show", _egress_show,
                       "one readable line per record: run, round, message, outcome, what the reply held (arrays as "
                       "dtype and shape, disclosed numbers as values, bytes as sizes)")
    show.add_argument("--config", required=True, help="the site's site.yaml")
    show.add_argument("--last", type=whole_number(0), default=0, help="only the last N records (default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
