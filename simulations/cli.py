"""`fedpath-sim`: the researcher's command. Simulated federations, generated slides, a local demo consortium."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.cli import add_command, run_cli, whole_number
from shared.errors import UserError


def _generate_sites(out: Path, args: argparse.Namespace, backbone_weights: str = "random",
                    privacy: dict | None = None) -> list[Path]:
    """The hospitals the generation options ask for (``consortium.make_consortium``); their site.yaml paths."""
    from simulations.consortium import make_consortium

    return make_consortium(out, args.sites, args.slides_per_site, args.seed, args.size, args.tile_size,
                           backbone_weights=backbone_weights, privacy=privacy, mpp=args.mpp,
                           vary_size=not args.fixed_size)


def _output_folder(path: Path, what: str = "--out") -> Path:
    """``path``, refused when it or a folder above it is a file: mkdir's traceback would name no option."""
    blocker = next((folder for folder in (path, *path.parents) if folder.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"{what} {path}: {blocker} is a file, not a folder")
    return path


def _make_slides(args: argparse.Namespace) -> int:
    from simulations.consortium import written_sites

    out = _output_folder(Path(args.out))
    # A researcher's hand-edited site.yaml or manifest is not replaced unasked (the demo and the
    # library's make_consortium own their folders and rewrite them).
    taken = written_sites(out, args.sites)
    if taken and not args.force:
        raise UserError(f"--out {out}: hospital folder(s) {', '.join(taken)} already hold a site.yaml or "
                        "manifest.csv, which make-slides would overwrite with the slides beside them. Pass --force "
                        "to replace them, or give another --out")
    configs = _generate_sites(out, args)
    for config in configs:
        print(f"{config.parent.name}: {config.parent / 'manifest.csv'}  (site config: {config})")
    return 0


DEMO_SETTINGS = {"model": {"core": "rnn", "hidden": 64, "frozen_projection": True},
                 "training": {"epochs": 2, "batch_size": 8, "learning_rate": 0.01},
                 "strategy": {"server_optimizer": {"name": "momentum", "learning_rate": 1.0, "momentum": 0.9}}}
"""What the demo federation trains: fedpath's measured levers for DP (frozen projection, server momentum;
docs/benchmarks.md), sized for a few dozen patients per hospital (docs/simulation.md, the demo)."""
DEMO_SITE_PRIVACY = {"release_evaluation": False, "lifetime_epsilon": 24.0}
"""A few dozen validation patients per hospital: noisy evaluation counts would say nothing and cost a
quarter of ε, so the demo hospitals spend it all on training, and the demo scores the models itself."""


def _demo(args: argparse.Namespace) -> int:
    from client.prepare import prepare_site
    from client.site_config import load_site_config
    from server.encoder_pretraining import PretrainSettings, pretrain_encoder
    from simulations.demo_validation import score_rounds, validation_table
    from simulations.local_consortium import LocalConsortium
    from simulations.public_tiles import make_public_tiles

    out = _output_folder(Path(args.out)).resolve()
    trunk = out / "consortium" / "trunk.pth"
    print(f"the consortium fits the frozen projection on {2 * args.public_tiles} generated public tiles "
          "(the trunk stays random: no weights can be downloaded here) ...", flush=True)
    public = make_public_tiles(out / "public-tiles", args.public_tiles, args.tile_size)
    result = pretrain_encoder(public, trunk, PretrainSettings(tile_size=args.tile_size, epochs=0), progress=False)
    print(f"trunk {trunk}  sha256 {result.sha256[:16]}…  projection validation accuracy "
          f"{result.record['projection']['validation']['accuracy']:.3f}")
    print(f"\ngenerating {args.sites} hospitals x {args.slides_per_site} slides in {out} ...", flush=True)
    configs = _generate_sites(out / "sites", args, backbone_weights=str(trunk), privacy=DEMO_SITE_PRIVACY)
    for path in configs:
        summary = prepare_site(load_site_config(path))
        print(f"\n== {path.parent.name} ==\n{summary.report()}")
    settings = {"federation": {"rounds": args.rounds, "min_sites": 2, "round_timeout": 300},
                **{key: dict(value) for key, value in DEMO_SETTINGS.items()}}
    settings["model"]["trunk_sha256"] = result.sha256
    print(f"\nstarting a SuperLink behind its proxy and {len(configs)} SuperNodes on 127.0.0.1 (TLS, registered "
          f"site keys, SecAgg+), {args.rounds} rounds, DP at every site ...", flush=True)
    with LocalConsortium(out / "consortium", configs, server_settings=settings) as consortium:
        consortium.start_all()
        code, folder = consortium.run()
    scored = score_rounds(folder.path, configs, out / "validation")
    print("\n" + validation_table(scored))
    print(f"\nresults: {folder.path}  (checkpoints/, audit.jsonl, the sites' ε in metrics.csv)\n"
          f"validation: {out / 'validation'}  (curves.png, metrics.csv: every round's global model on the "
          "hospitals' validation slides)\n"
          "generated slides and a random trunk: the demo shows the machinery learning, not a clinical result")
    return code


def _sim_out(args: argparse.Namespace) -> Path:
    if args.out:
        return _output_folder(Path(args.out))
    return _output_folder(Path(args.config).resolve().parent / "simulation", "output folder")


def _split(args: argparse.Namespace) -> int:
    from simulations.sim_config import load_sim_config
    from simulations.split_preview import preview_split

    table, chart = preview_split(load_sim_config(args.config), _sim_out(args))
    print(f"{table}\n\nchart: {chart}\ntable: {chart.with_suffix('.txt')}")
    return 0


def _run(args: argparse.Namespace) -> int:
    import json

    from simulations.materialise import materialise
    from simulations.round_table import round_table
    from simulations.sim_config import load_sim_config
    from simulations.sim_runner import TEST_METRICS, run_simulation

    config = load_sim_config(args.config)
    out = _sim_out(args).resolve()
    print(f"preparing {config.simulation.sites} virtual hospitals in {out} ...", flush=True)
    layout = materialise(config, out)
    print(f"running {config.federation.rounds} rounds on Flower's Simulation Engine "
          f"({'DP at every site' if config.simulation.site_privacy.enabled else 'no DP'}) ...", flush=True)
    run = run_simulation(config, layout, out)
    test = json.loads((run / TEST_METRICS).read_text())
    from client.site_config import load_site_config

    print("\n" + round_table(run, {path.parent.name: load_site_config(path) for path in layout.site_configs}))
    print(f"\ntest set ({test['test_items']} items, {test['test_patients']} patients, checkpoint of round "
          f"{test['round']}): accuracy {test['accuracy']:.3f}, AUC {test.get('auc', float('nan')):.3f}")
    print(f"results: {run}  (metrics.csv, curves.png, audit.jsonl, checkpoints/, {TEST_METRICS})")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from simulations.experiment import run_experiment
    from simulations.experiment_config import load_experiment_config

    config = load_experiment_config(args.config)
    if args.out:
        config = replace(config, out_dir=Path(args.out).resolve())
    print(f"experiment '{config.name}': {len(config.cells())} cells in {config.out_dir}", flush=True)
    files = run_experiment(config)
    print(f"report: {files[0]}  ({', '.join(path.name for path in files[1:])})")
    return 0


def _add_sim_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="sim.yaml (see configs/sim.example.yaml)")
    parser.add_argument("--out", help="folder for the virtual hospitals and runs (default: simulation/ beside "
                                      "sim.yaml)")


MIN_SLIDE_SIDE = 64  # what SlideSpec accepts; checked here too, to say which option is wrong


def slide_size(text: str) -> tuple[int, int]:
    """``--size``: ``N`` (a square slide) or ``WxH`` (e.g. ``80000x60000``), pixels at level 0."""
    parts = text.strip().lower().split("x")
    if len(parts) > 2 or not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a slide size: give N (square) or WxH, e.g. 2048 or "
                                         "80000x60000")
    width, height = (int(parts[0]), int(parts[-1]))
    if min(width, height) < MIN_SLIDE_SIDE:
        raise argparse.ArgumentTypeError(f"slide size {width}x{height} is too small: each side must be at least "
                                         f"{MIN_SLIDE_SIDE} px")
    return width, height


def site_tile_size(text: str) -> int:
    """``--tile-size``: checked by site.yaml's own rule for ``tiling.tile_size``, so that the next
    `fedpath-site check` accepts the site.yaml written with it."""
    from dataclasses import fields

    from client.site_config import TilingConfig

    value = whole_number()(text)
    rule = next(field for field in fields(TilingConfig) if field.name == "tile_size").metadata["check"]
    problem = rule(value)
    if problem:
        raise argparse.ArgumentTypeError(f"{value}: {problem}, as site.yaml's tiling.tile_size (the sites would "
                                         "refuse the site.yaml)")
    return value


def microns_per_pixel(text: str) -> float:
    """``--mpp``: µm per pixel at level 0, positive (0.25 is 40x, 0.5 is 20x)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of µm per pixel (e.g. 0.25 or 0.5)") from None
    if not 0 < value < 100:
        raise argparse.ArgumentTypeError(f"µm per pixel must be above 0 and below 100, got {text}")
    return value


def _add_generation_options(parser: argparse.ArgumentParser, sites: int, slides: int, size: int = 2048,
                            tile_size: int = 299) -> None:
    parser.add_argument("--out", required=True, help="folder for the generated hospitals")
    parser.add_argument("--sites", type=whole_number(1), default=sites, help=f"number of hospitals (default {sites})")
    parser.add_argument("--slides-per-site", type=whole_number(1), default=slides,
                        help=f"slides per hospital (default {slides})")
    parser.add_argument("--seed", type=whole_number(0), default=0, help="same seed, same slides (default 0; >= 0)")
    parser.add_argument("--size", type=slide_size, default=(size, size), metavar="N|WxH",
                        help=f"slide size in pixels at level 0: N (square) or WxH, e.g. 80000x60000; each side "
                             f"±25%% per slide unless --fixed-size (default {size}). Slides of more pixels than "
                             "8192x8192 are rendered tile by tile and streamed to disk, in memory that does not "
                             "grow with their size")
    parser.add_argument("--fixed-size", action="store_true", help="every slide exactly --size, not jittered")
    parser.add_argument("--mpp", type=microns_per_pixel, default=0.5,
                        help="µm per pixel at level 0 (default 0.5, 20x; 0.25 is 40x)")
    parser.add_argument("--tile-size", type=site_tile_size, default=tile_size,
                        help=f"tile size written into each site.yaml, at least 75 like tiling.tile_size "
                             f"(default {tile_size})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpath-sim", description=__doc__)
    commands = parser.add_subparsers(title="commands")
    make = add_command(commands, "make-slides", _make_slides,
                       "write pyramidal JPEG-tiled TIFF slides, a manifest.csv and a site.yaml per hospital")
    _add_generation_options(make, sites=3, slides=6)
    make.add_argument("--force", action="store_true",
                      help="replace the site.yaml, manifest.csv and slides of hospitals already in --out")
    demo = add_command(commands, "demo", _demo,
                       "the local demo consortium: generate three hospitals' slides, prepare each site's feature "
                       "cache, then run a real SuperLink and three SuperNodes on 127.0.0.1 for a federated run "
                       "with DP at every site; every process is stopped at the end")
    # Many small slides: DP needs dozens of patients per hospital to learn in five rounds.
    _add_generation_options(demo, sites=3, slides=60, size=768, tile_size=96)
    demo.add_argument("--rounds", type=whole_number(1), default=5, help="federated rounds (default 5)")
    demo.add_argument("--public-tiles", type=whole_number(2), default=300,
                      help="generated public tiles per class the projection is fitted on (default 300)")
    run = add_command(commands, "run", _run,
                      "simulate N hospitals on Flower's Simulation Engine with the deployed ServerApp and ClientApp "
                      "(DP and privacy ledgers included): split the data, prepare every site's feature cache, run, "
                      "then score the best checkpoint on the held-out test patients")
    _add_sim_options(run)
    split = add_command(commands, "split", _split,
                        "preview a simulation's split without training: class counts, patients and train/val per "
                        "site in a table and a PNG bar chart")
    _add_sim_options(split)
    experiment = add_command(commands, "experiment", _experiment,
                             "run a grid of simulations (strategy, DP and ε, Dirichlet α, sites, seeds) with the "
                             "centralised and local-only baselines, all scored on one held-out test set, then write "
                             "report.md with mean ± std over seeds and PNG plots; finished cells are kept on a rerun")
    experiment.add_argument("--config", required=True, help="exp.yaml (see configs/experiment.example.yaml)")
    experiment.add_argument("--out", help="folder for the experiment (default: out_dir of exp.yaml, else "
                                          "experiments/<name>/ beside it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
