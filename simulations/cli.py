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
    from client.train_local import train_local
    from simulations.consortium import make_consortium

    out = Path(args.out)
    print(f"generating {args.sites} hospitals x {args.slides_per_site} slides in {out} ...")
    configs = make_consortium(out, args.sites, args.slides_per_site, args.seed, args.size, args.tile_size)
    failed = 0
    trained = []
    for path in configs:
        config = load_site_config(path)
        summary = prepare_site(config)
        print(f"\n== {path.parent.name} ==\n{summary.report()}")
        failed += summary.count("skipped")
        trained.append((path.parent.name, train_local(config)))
    print("\nlocal training per site (DP on, random trunk: a smoke run, not a result):")
    for name, run in trained:
        shown = "n/a" if run.val_accuracy is None else f"{run.val_accuracy:.2f}"
        print(f"  {name}: validation accuracy {shown}, ε spent {run.epsilon:.2f}  ({run.folder})")
    print(f"\ndemo consortium ready in {out}: check a site with `fedpath-site check --config {configs[0]}`")
    return 1 if failed else 0


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
                       "the local demo: generate three hospitals' slides, prepare each site's feature cache, "
                       "train each site's head alone under DP")
    _add_generation_options(demo, sites=3, slides=6)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
