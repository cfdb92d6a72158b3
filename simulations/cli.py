"""`fedpath-sim`: the researcher's command. Generated slides and a local demo consortium."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.cli import add_command, run_cli


def _make_slides(args: argparse.Namespace) -> int:
    from simulations.consortium import make_consortium

    configs = make_consortium(Path(args.out), args.sites, args.slides_per_site, args.seed, args.size,
                              args.tile_size)
    for config in configs:
        print(f"{config.parent.name}: {config.parent / 'manifest.csv'}  (site config: {config})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from client.prepare import prepare_site
    from client.site_config import load_site_config
    from simulations.consortium import make_consortium
    from simulations.local_consortium import LocalConsortium
    from simulations.round_table import round_table

    out = Path(args.out).resolve()
    print(f"generating {args.sites} hospitals x {args.slides_per_site} slides in {out} ...")
    configs = make_consortium(out / "sites", args.sites, args.slides_per_site, args.seed, args.size, args.tile_size)
    for path in configs:
        summary = prepare_site(load_site_config(path))
        print(f"\n== {path.parent.name} ==\n{summary.report()}")
    settings = {"federation": {"rounds": args.rounds, "min_sites": 2, "round_timeout": 300},
                "training": {"epochs": 2, "batch_size": 2, "learning_rate": 0.003}}
    print(f"\nstarting a SuperLink and {len(configs)} SuperNodes on 127.0.0.1 (TLS, registered site keys, SecAgg+), "
          f"{args.rounds} rounds, DP at every site ...")
    with LocalConsortium(out / "consortium", configs, server_settings=settings) as consortium:
        consortium.start_all()
        code, folder = consortium.run()
    print("\n" + round_table(folder.path))
    print(f"\nresults: {folder.path}  (metrics.csv, curves.png, audit.jsonl, checkpoints/)\n"
          "the trunk is random offline, so accuracy is a smoke check, not a result")
    return code


def _add_generation_options(parser: argparse.ArgumentParser, sites: int, slides: int) -> None:
    parser.add_argument("--out", required=True, help="folder for the generated hospitals")
    parser.add_argument("--sites", type=int, default=sites, help=f"number of hospitals (default {sites})")
    parser.add_argument("--slides-per-site", type=int, default=slides, help=f"slides per hospital (default {slides})")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same slides (default 0)")
    parser.add_argument("--size", type=int, default=2048, help="slide side in pixels at level 0, ±25%% per slide")
    parser.add_argument("--tile-size", type=int, default=299, help="tile size written into each site.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpath-sim", description=__doc__)
    commands = parser.add_subparsers(title="commands")
    make = add_command(commands, "make-slides", _make_slides,
                       "write pyramidal JPEG-tiled TIFF slides, a manifest.csv and a site.yaml per hospital")
    _add_generation_options(make, sites=3, slides=6)
    demo = add_command(commands, "demo", _demo,
                       "the local demo consortium: generate three hospitals' slides, prepare each site's feature "
                       "cache, then run a real SuperLink and three SuperNodes on 127.0.0.1 for a federated run "
                       "with DP at every site; every process is stopped at the end")
    _add_generation_options(demo, sites=3, slides=8)
    demo.add_argument("--rounds", type=int, default=5, help="federated rounds (default 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
