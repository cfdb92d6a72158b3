"""`fedpath-server`: the consortium admin's command.

Make the consortium's certificates, start the SuperLink and its proxy, submit a federated run and follow it,
see runs and sites, resume a run after a crash, verify a run's audit log, and show a checkpoint's model card.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from shared.cli import add_command, run_cli


def _init(args: argparse.Namespace) -> int:
    from server.certificates import describe, init_consortium

    files = init_consortium(Path(args.out), args.name, args.san or (), days=args.days, force=args.force)
    server = describe(files.server_cert)
    print(f"consortium CA      {files.ca_cert}  (give this file to every hospital)\n"
          f"CA private key     {files.ca_key}  (keep offline; only needed to renew)\n"
          f"server certificate {files.server_cert}  valid until {server['not_valid_after']}, names "
          f"{', '.join(server['sans'])}\n"
          f"server private key {files.server_key}  (stays on the server; mode 0600)")
    return 0


def _renew_cert(args: argparse.Namespace) -> int:
    from server.certificates import ConsortiumFiles, describe, renew_server_certificate

    files = ConsortiumFiles.in_folder(Path(args.out))
    renew_server_certificate(files, args.name, args.san or (), days=args.days)
    server = describe(files.server_cert)
    print(f"new server certificate {files.server_cert} valid until {server['not_valid_after']} (same CA: hospitals "
          "keep their ca.pem); restart the SuperLink to use it")
    return 0


def _start(args: argparse.Namespace) -> int:
    from server.server_config import load_server_config
    from server.superlink import start_server

    return start_server(load_server_config(args.config), insecure=args.insecure, detach=args.detach)


def _stop(args: argparse.Namespace) -> int:
    from server.server_config import load_server_config
    from server.superlink import StatePaths, stop_server

    stopped = stop_server(StatePaths(load_server_config(args.config)))
    print(f"stopped: {', '.join(stopped)}" if stopped
          else "none of the server's processes (SuperLink, pull relay, proxy) was running")
    return 0


def _run(args: argparse.Namespace) -> int:
    from server.run_control import submit_and_follow
    from server.run_folder import RunFolder
    from server.server_config import load_server_config
    from server.superlink import FlowerControl, FlowerError

    config = load_server_config(args.config)  # validated before anything is created
    control = FlowerControl(config, insecure=args.insecure)
    folder = RunFolder.create(Path(args.config))
    try:
        return submit_and_follow(control, folder, follow=not args.no_follow)
    except FlowerError as error:
        if folder.run_info().get("flower_runs"):
            raise
        try:  # `flwr run` may also fail after the SuperLink took the run (a timeout): then the folder stays
            control.runs()
        except FlowerError:  # the SuperLink does not answer at all: it took no run, keep no folder for one
            shutil.rmtree(folder.path, ignore_errors=True)
            raise FlowerError(f"{error}\nNo run was started (its folder is removed). Is the SuperLink running? "
                              f"`fedpath-server status --config {args.config}`") from None
        raise FlowerError(f"{error}\nThe SuperLink answers, so it may have taken the run: {folder.path} is kept; "
                          f"`fedpath-server status --config {args.config}` lists the Flower runs") from None


def _resume(args: argparse.Namespace) -> int:
    from server.run_control import submit_and_follow
    from server.run_folder import RunFolder
    from server.superlink import FlowerControl

    folder = RunFolder.open(Path(args.run_dir))
    status = folder.status()
    if status.get("state") == "finished":
        print(f"{folder.path}: all {status.get('total_rounds')} rounds are done; nothing to resume")
        return 0
    print(f"{folder.path}: resuming after round {status.get('round', 0)} of {folder.run_info()['total_rounds']}")
    return submit_and_follow(FlowerControl(folder.config(), insecure=args.insecure), folder,
                             follow=not args.no_follow)


def _status(args: argparse.Namespace) -> int:
    from server.server_config import load_server_config
    from server.status_report import status_report
    from server.superlink import FlowerControl

    config = load_server_config(args.config)
    report, reachable = status_report(config, FlowerControl(config, insecure=args.insecure))
    print(report)
    return 0 if reachable else 1


def _dashboard(args: argparse.Namespace) -> int:
    from server.dashboard import serve
    from server.server_config import load_server_config

    serve(load_server_config(args.config), host=args.host, port=args.port, insecure=args.insecure,
          superlink=not args.no_superlink)
    return 0


def _add_site(args: argparse.Namespace) -> int:
    from server.registration import add_site
    from server.server_config import load_server_config
    from server.superlink import FlowerControl

    config = load_server_config(args.config)
    print(add_site(config, FlowerControl(config, insecure=False), args.name, Path(args.public_key)))
    return 0


def _remove_site(args: argparse.Namespace) -> int:
    from server.registration import remove_site
    from server.server_config import load_server_config
    from server.superlink import FlowerControl

    config = load_server_config(args.config)
    node_id = remove_site(config, FlowerControl(config, insecure=False), args.name)
    print(f"{args.name} (node {node_id}) removed: its SuperNode is cut off now, mid-run included")
    return 0


def _sites(args: argparse.Namespace) -> int:
    from server.registration import sites_table
    from server.server_config import load_server_config
    from server.superlink import FlowerControl

    config = load_server_config(args.config)
    text, flagged = sites_table(config, FlowerControl(config, insecure=args.insecure))
    print(text)
    return 1 if flagged else 0


def _audit_verify(args: argparse.Namespace) -> int:
    from server.audit import verify
    from server.run_folder import RunFolder

    folder = RunFolder.open(Path(args.run_dir))
    count = verify(folder.audit_log, expected_last_hash=folder.status().get("audit_last_hash"))
    print(f"{folder.audit_log}: {count} records, hash chain intact, last record matches status.json")
    return 0


def _pretrain_encoder(args: argparse.Namespace) -> int:
    from server.encoder_pretraining import PretrainSettings, pretrain_encoder, summary

    settings = PretrainSettings(tile_size=args.tile_size, epochs=args.epochs, batch_size=args.batch_size,
                                learning_rate=args.lr, val_fraction=args.val_fraction, seed=args.seed,
                                init=args.init, mpp=args.mpp, num_workers=args.workers,
                                device=args.device)
    print(summary(pretrain_encoder(Path(args.tiles), Path(args.out), settings, progress=not args.no_progress,
                                   projection=args.projection)))
    return 0


def _bundle_digest(args: argparse.Namespace) -> int:
    from shared.app_bundle import installed_bundle_report

    print(installed_bundle_report())
    return 0


def _model_info(args: argparse.Namespace) -> int:
    import json

    from server.model_info import model_info, render

    info = model_info(Path(args.checkpoint))
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpath-server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(title="commands")

    init = add_command(commands, "init", _init, "make the consortium CA and the SuperLink's TLS certificate")
    init.add_argument("--name", required=True, help="the server's public host name (put into the certificate)")
    init.add_argument("--san", action="append", help="another host name or IP the sites may use (repeatable)")
    init.add_argument("--out", default="certs", help="folder for the files (default: certs)")
    init.add_argument("--days", type=int, default=365, help="validity of the server certificate (default 365)")
    init.add_argument("--force", action="store_true", help="overwrite existing files")

    renew = add_command(commands, "renew-cert", _renew_cert,
                        "issue a new server certificate from the existing consortium CA")
    renew.add_argument("--name", required=True, help="the server's public host name")
    renew.add_argument("--san", action="append", help="another host name or IP the sites may use (repeatable)")
    renew.add_argument("--out", default="certs", help="the folder `init` wrote (default: certs)")
    renew.add_argument("--days", type=int, default=365, help="validity (default 365)")

    def with_config(sub: argparse.ArgumentParser, insecure: bool = True) -> argparse.ArgumentParser:
        """``--config`` (every command on a running consortium), and ``--insecure`` where TLS can be off."""
        sub.add_argument("--config", required=True, help="the consortium's server.yaml")
        if insecure:
            sub.add_argument("--insecure", action="store_true", help="no TLS (test machines only; warns loudly)")
        return sub

    start = with_config(add_command(commands, "start", _start,
                                    "start the SuperLink on 127.0.0.1:loopback_port (SQLite state, log file, "
                                    "offline-safe), its pull relay, and its nginx proxy on the sites' port, which "
                                    "passes only the Fleet API; Ctrl-C stops all three"))
    start.add_argument("--detach", action="store_true", help="run all three in the background with pid files")
    with_config(add_command(commands, "stop", _stop,
                            "stop the SuperLink, its pull relay and its proxy started with --detach"),
                insecure=False)
    run = with_config(add_command(commands, "run", _run,
                                  "submit a federated run, print a line per round, exit 1 unless it completes"))
    run.add_argument("--no-follow", action="store_true", help="submit and return at once")
    with_config(add_command(commands, "status", _status, "runs, their state and round, sites online, ε per site"))
    dashboard = with_config(add_command(
        commands, "dashboard", _dashboard,
        "a read-only web page that follows the consortium live: sites (unknown nodes flagged), runs, rounds, curves, "
        "ε per site against the budget, refusals, the audit chain; 127.0.0.1 unless --host (then HTTPS only)"))
    dashboard.add_argument("--host", default="127.0.0.1",
                           help="address to listen on (default 127.0.0.1; any other is served over HTTPS with the "
                                "SuperLink's certificate)")
    dashboard.add_argument("--port", type=int, default=8050, help="default 8050")
    dashboard.add_argument("--no-superlink", action="store_true",
                           help="do not ask the SuperLink which sites are online (show the registry only)")
    resume = add_command(commands, "resume", _resume,
                         "continue a run from its last checkpoint; round numbers go on")
    resume.add_argument("run_dir", help="the run folder (printed by `run`)")
    resume.add_argument("--insecure", action="store_true", help="no TLS (test machines only)")
    resume.add_argument("--no-follow", action="store_true", help="submit and return at once")

    # Registration needs TLS: Flower ties SuperNode authentication to it, so these take no --insecure.
    add = with_config(add_command(commands, "add-site", _add_site, "register a hospital's public key (from "
                                  "`fedpath-site keygen`): only registered sites may join"), insecure=False)
    add.add_argument("name", help="the hospital's name, as it will appear in reports and the audit log")
    add.add_argument("public_key", help="the hospital's .pub file")
    remove = with_config(add_command(commands, "remove-site", _remove_site,
                                     "revoke a hospital at once (mid-run included)"), insecure=False)
    remove.add_argument("name", help="the registered name")
    with_config(add_command(commands, "sites", _sites,
                            "every node the SuperLink knows, with the registered hospital's name, key fingerprint "
                            "and online state; flags nodes the registry does not name (exit 1 if any)"))

    pretrain = add_command(commands, "pretrain-encoder", _pretrain_encoder,
                           "train the InceptionV3 trunk on public labelled tiles (no DP, nothing private); "
                           "rerun the same command to continue an interrupted run")
    pretrain.add_argument("--tiles", required=True, help="folder with one sub-folder of image tiles per class")
    pretrain.add_argument("--out", required=True, help="trunk weights to write (.pth); metadata goes beside as .json")
    pretrain.add_argument("--tile-size", type=int, default=96, help="pixels, the size sites will tile at (default 96)")
    pretrain.add_argument("--epochs", type=int, default=10,
                          help="default 10; 0 keeps the --init trunk as it is and fits only the projection")
    pretrain.add_argument("--batch-size", type=int, default=32, help="default 32")
    pretrain.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, one-cycle (default 1e-3)")
    pretrain.add_argument("--val-fraction", type=float, default=0.1, help="tiles held out per class (default 0.1)")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.add_argument("--init", default="random", help="starting trunk: random, imagenet or a .pth")
    pretrain.add_argument("--mpp", type=float, help="µm/px of the tiles, recorded in the metadata")
    pretrain.add_argument("--workers", type=int, default=1, help="tile-reading processes (default 1)")
    pretrain.add_argument("--device", default="auto",
                          help="auto (the first CUDA GPU, else Apple MPS, else the CPU), cpu, cuda, cuda:N or mps "
                               "(default auto)")
    pretrain.add_argument("--projection", type=int, default=128,
                          help="size of the projection fitted on the frozen trunk for model.frozen_projection "
                               "(default 128, model.projection's default; 0: none)")
    pretrain.add_argument("--no-progress", action="store_true", help="no progress bar")

    add_command(commands, "bundle-digest", _bundle_digest,
                "the content digest of the app bundle `run` submits (this installed fedpath version): announce it to "
                "the hospitals, whose sites run only bundles with their installed version's digest or one they list")
    info = add_command(commands, "model-info", _model_info,
                       "a checkpoint's model card (variant, training, rounds, sites, ε and δ per site, metrics, audit "
                       "hash, sha256) after verifying the checkpoint against it; exit 2 if they do not match")
    info.add_argument("checkpoint", help="a checkpoint .npz (round-NNNN, latest or best) with its .json beside it")
    info.add_argument("--json", action="store_true", help="print the fields as JSON")

    audit = commands.add_parser("audit", help="audit log commands").add_subparsers(
        title="audit commands", dest="audit_command", required=True)
    add_command(audit, "verify", _audit_verify,
                "check a run's audit log: every record unedited, none removed, reordered or cut off"
                ).add_argument("run_dir", help="the run folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
