"""What a federated round costs beyond the sites' own training, and what each site sends.

Three generated hospitals on 127.0.0.1 as real processes (SuperLink, three SuperNodes, TLS,
registered keys), ``rounds`` rounds, once with plain FedAvg messages (the sites allow plain
rounds for this run) and once with SecAgg+ (``secagg_*`` keys). Evaluation rides in the
training message (the sites score the model they receive, inside the masked vector), so there
is no evaluate phase. ``overhead_s``: per-round wall time measured by the ServerApp minus the
slowest site's own time in `fit` (the sites disclose ``train_seconds`` here; they train in
parallel): process start-up, message passing and the server's bookkeeping.
``secagg_ratio``: SecAgg+ round time over plain round time, same run (goal <= 1.3; ``secagg_goal_met``).
``round_s_2on`` and ``secagg_ratio_2on``: rounds 2 on only (the first also makes every site's noise plan,
a σ search of seconds, which flatters the all-rounds ratio); ``round_s_outside`` and ``secagg_ratio_outside``:
the same rounds by the file system's clock (one checkpoint closes each round), a check on the ServerApp's
own clock that both arms share.
``trained_*``: both again (relay on) with ``TRAINED_EPOCHS`` epochs per round instead of one (at a
learning rate divided by them), so the sites train for about 9 s rather than about 1 s: SecAgg+ adds
a fixed number of exchanges per round (five against one), so its ratio to a plain round depends on how
long the sites train, and a hospital's round trains for minutes. ``trained_secagg_ratio`` is that ratio,
same run, same sites. ``longer_*``: the same with ``LONGER_EPOCHS`` (about 25 s of training), so the
ratio at a longer round is measured rather than extrapolated; ``by_training`` lists the three pairs and
``round_overhead.png`` (beside the JSON) plots them. The sites run as `LocalConsortium` starts them: one
torch thread each on this 2-core machine (``features.threads``); with torch's default two each, their
training time swung 5-20x with how much it overlapped, and the two arms were not comparable.
``no_relay_*`` and ``relay_speedup``: both again with ``superlink.pull_hold_s: 0`` (the sites'
pulls straight to the SuperLink, server/pull_relay.py off), same run, same sites.
``bytes_per_site_round``: what the SuperLink
received from the sites (Flower's own traffic counter for the run) per site and round, against
``trainable_param_bytes``, the float32 bytes of what is trained. The import times show what a
fresh ClientApp process pays (a SuperNode with Flower's default subprocess isolation starts one
per message; fedpath's site task runner imports the ClientApp once and keeps it): stages that do
not train import neither Opacus nor torchvision's model zoo.
"""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from client.prepare import prepare_site
from client.site_config import load_site_config
from server.app import initial_model
from server.server_config import LocalTraining
from simulations.consortium import make_consortium
from simulations.local_consortium import LocalConsortium


def _import_seconds(statement: str) -> float:
    """Wall time of a fresh interpreter running ``statement`` (what a ClientApp process pays)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return round(time.perf_counter() - start, 2)


def _allow_plain_rounds_and_disclose_time(sites: list[Path]) -> None:
    for site in sites:
        document = yaml.safe_load(site.read_text())
        document["disclose"] = ["epsilon", "refused", "train_seconds"]
        document.setdefault("federation", {})["require_secure_aggregation"] = False
        site.write_text(yaml.safe_dump(document))


# About 9 s of training per round here (13 s on the slower machines of 2026-12-04), one torch thread per site.
# Until 2026-12-04 16:00 it was 30 epochs, and the "14 s" those took was mostly three sites' torch threads
# spinning on two cores (0.9-1.6 s with one each).
TRAINED_EPOCHS = 300
GOAL_SECAGG_RATIO = 1.3  # a SecAgg+ round at most this many times a plain one (issue 15)
GOAL_OVERHEAD_S = 5.0  # a plain round's time beyond the slowest site's training
# Three times as long: where the 1.3 goal falls, measured (2026-12-04 it was extrapolated to about 21 s of round).
LONGER_EPOCHS = 900
PLOT = Path(__file__).resolve().parent / "results" / "round_overhead.png"


def _measure(root: Path, sites: list[Path], rounds: int, secure: bool, relay: bool = True, epochs: int = 1) -> dict:
    # The same total step length whatever the epochs: 300 epochs at the default rate moved the head by more than
    # the sites' update bound (federation.max_update_norm 10: 13.4), and the sites refused to send it.
    training = {"epochs": epochs, "batch_size": 2, "learning_rate": LocalTraining().learning_rate / epochs}
    settings = {"federation": {"rounds": rounds, "min_sites": 3, "round_timeout": 300},
                "training": training, "secure_aggregation": {"enabled": secure}}
    if not relay:
        settings["superlink"] = {"pull_hold_s": 0}  # every pull straight to the SuperLink, as before the relay
    with LocalConsortium(root, sites, server_settings=settings) as consortium:
        consortium.start_all()
        code, folder = consortium.run()
        if code != 0:
            raise RuntimeError(f"the benchmark run failed: {folder.status()}")
        flower = consortium.control.run(folder.run_info()["flower_runs"][-1])
        config = consortium.config
    timings = [e["timing"] for e in json.loads((folder.path / "metrics.json").read_text()) if e["round"] >= 1]
    # The same rounds by the file system's clock, outside the ServerApp: one checkpoint closes each round, so
    # the time from one to the next is a round and what the server does between two (rounds 2 on).
    closed = sorted((folder.path / "checkpoints").glob("round-*.npz"))
    outside = [b.stat().st_mtime - a.stat().st_mtime for a, b in itertools.pairwise(closed[1:])]  # [0]: round 0
    param_bytes = sum(a.nbytes for a in initial_model(config).values())
    per_site_round = flower["network-traffic"]["inbound-bytes"] / (len(sites) * rounds)
    return {
        "round_s": round(statistics.mean(t["round_s"] for t in timings), 2),
        "fit_phase_s": round(statistics.mean(t["fit_phase_s"] for t in timings), 2),
        "site_train_s_max": round(statistics.mean(t["site_train_s_max"] for t in timings), 2),
        "overhead_s": round(statistics.mean(t["round_s"] - t["site_train_s_max"] for t in timings), 2),
        "overhead_s_by_round": [round(t["round_s"] - t["site_train_s_max"], 2) for t in timings],
        "round_s_by_round": [round(t["round_s"], 2) for t in timings],
        # rounds 2 on, by the ServerApp's clock and by the checkpoints' (round 1 also makes each site's noise plan)
        "round_s_2on": round(statistics.mean(t["round_s"] for t in timings[1:]), 2) if timings[1:] else None,
        "round_s_outside": round(statistics.mean(outside), 2) if outside else None,
        "bytes_per_site_round": int(per_site_round),
        "trainable_param_bytes": int(param_bytes),
        "bytes_ratio": round(per_site_round / param_bytes, 3),
    }


def run(quick: bool) -> dict:
    rounds, slides = (2, 4) if quick else (4, 6)
    with tempfile.TemporaryDirectory() as tmp:
        sites = make_consortium(Path(tmp) / "sites", 3, slides, seed=3, size=1536, tile_size=149, progress=False)
        for site in sites:
            prepare_site(load_site_config(site), progress=False)
        _allow_plain_rounds_and_disclose_time(sites)
        plain = _measure(Path(tmp) / "plain", sites, rounds, secure=False)
        secure = _measure(Path(tmp) / "secagg", sites, rounds, secure=True)
        # the same two without the pull relay (superlink.pull_hold_s: 0): what the relay saves
        plain_direct = _measure(Path(tmp) / "plain-direct", sites, rounds, secure=False, relay=False)
        secure_direct = _measure(Path(tmp) / "secagg-direct", sites, rounds, secure=True, relay=False)
        # the sites training for seconds: the same fixed SecAgg+ exchanges against a longer fit
        plain_trained = _measure(Path(tmp) / "plain-trained", sites, rounds, secure=False, epochs=TRAINED_EPOCHS)
        secure_trained = _measure(Path(tmp) / "secagg-trained", sites, rounds, secure=True, epochs=TRAINED_EPOCHS)
        plain_longer = _measure(Path(tmp) / "plain-longer", sites, rounds, secure=False, epochs=LONGER_EPOCHS)
        secure_longer = _measure(Path(tmp) / "secagg-longer", sites, rounds, secure=True, epochs=LONGER_EPOCHS)
    arms = ((1, plain, secure), (TRAINED_EPOCHS, plain_trained, secure_trained),
            (LONGER_EPOCHS, plain_longer, secure_longer))
    by_training = [_pair(epochs, plain_arm, secure_arm) for epochs, plain_arm, secure_arm in arms]
    if not quick:  # a smoke test leaves the full run's plot alone
        _plot(by_training, PLOT)
    return {
        "sites": 3, "rounds": rounds, "slides_per_site": slides, "tls": True,
        # plain FedAvg messages (secure_aggregation.enabled: false): the figures
        **plain,
        # the default, SecAgg+: five exchanges per fit (Flower's four and the signed survivors),
        # masked vectors as 64-bit integers
        **{f"secagg_{key}": value for key, value in secure.items() if key != "trainable_param_bytes"},
        "secagg_ratio": round(secure["round_s"] / plain["round_s"], 3),
        "secagg_goal_met": secure["round_s"] / plain["round_s"] <= GOAL_SECAGG_RATIO,
        "overhead_goal_met": plain["overhead_s"] <= GOAL_OVERHEAD_S,
        # rounds 2 on (round 1 also makes every site's noise plan, a σ search of seconds), by the ServerApp's clock
        # and by the checkpoints' (the file system's): the second checks the first
        "secagg_ratio_2on": _ratio(secure["round_s_2on"], plain["round_s_2on"]),
        "secagg_ratio_outside": _ratio(secure["round_s_outside"], plain["round_s_outside"]),
        "no_relay_round_s": plain_direct["round_s"], "no_relay_overhead_s": plain_direct["overhead_s"],
        "no_relay_secagg_round_s": secure_direct["round_s"],
        "no_relay_secagg_overhead_s": secure_direct["overhead_s"],
        # round time without the relay / with it, same run, same sites
        "relay_speedup": round(plain_direct["round_s"] / plain["round_s"], 3),
        "relay_secagg_speedup": round(secure_direct["round_s"] / secure["round_s"], 3),
        **_training_keys("trained", TRAINED_EPOCHS, plain_trained, secure_trained),
        **_training_keys("longer", LONGER_EPOCHS, plain_longer, secure_longer),
        "by_training": by_training,
        "evaluate_phase": "none: the sites score the received model inside the training exchange",
        # A ClientApp process imports only Flower; evaluation adds torch, training adds Opacus. Before
        # the split, every evaluation also imported Opacus and torchvision's model zoo:
        "clientapp_import_s": _import_seconds("import client.app"),
        "evaluate_imports_s": _import_seconds("import client.app, client.federated_round"),
        "evaluate_imports_before_split_s": _import_seconds(
            "import client.app, client.federated_round, opacus, torchvision.models"),
        "fit_imports_s": _import_seconds("import client.app, client.federated_round, client.private_training"),
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return round(numerator / denominator, 3) if numerator and denominator else None


def _training_keys(prefix: str, epochs: int, plain: dict, secure: dict) -> dict:
    """``{prefix}_epochs``, both arms' round, slowest training and overhead, and ``{prefix}_secagg_ratio``."""
    keys = ("round_s", "site_train_s_max", "overhead_s")
    return {f"{prefix}_epochs": epochs, **{f"{prefix}_{key}": plain[key] for key in keys},
            **{f"{prefix}_secagg_{key}": secure[key] for key in keys},
            f"{prefix}_secagg_ratio": round(secure["round_s"] / plain["round_s"], 3)}


def _pair(epochs: int, plain: dict, secure: dict) -> dict:
    """One training length: both arms' rounds and what SecAgg+ adds beyond the slowest site's training.
    ``secagg_ratio_equal_training`` is derived, not measured: the plain arm's training plus each arm's own
    overhead. Three sites share two cores here, and the SecAgg+ arm's sites start training at different
    times (each after its own key stages), so they overlap less and train faster than the plain arm's;
    at a hospital each site trains on its own machine."""
    train = plain["site_train_s_max"]
    return {"epochs": epochs, "plain_round_s": plain["round_s"], "secagg_round_s": secure["round_s"],
            "plain_site_train_s_max": train, "secagg_site_train_s_max": secure["site_train_s_max"],
            "plain_overhead_s": plain["overhead_s"], "secagg_overhead_s": secure["overhead_s"],
            "secagg_added_s": round(secure["overhead_s"] - plain["overhead_s"], 2),
            "secagg_ratio": round(secure["round_s"] / plain["round_s"], 3),
            "secagg_ratio_equal_training": round((train + secure["overhead_s"]) / (train + plain["overhead_s"]), 3)}


def _plot(by_training: list[dict], path: Path) -> None:
    """Round time of both arms, and their ratio against the 1.3 goal, over the plain arm's training time."""
    from matplotlib.figure import Figure  # only when a full run draws

    from shared.atomic_files import atomic_write

    x = [pair["plain_site_train_s_max"] for pair in by_training]
    figure = Figure(figsize=(10, 4), layout="constrained")
    times, ratios = figure.subplots(1, 2)
    times.plot(x, [pair["plain_round_s"] for pair in by_training], "o-", label="plain FedAvg")
    times.plot(x, [pair["secagg_round_s"] for pair in by_training], "s-", label="SecAgg+")
    times.plot(x, [GOAL_SECAGG_RATIO * pair["plain_round_s"] for pair in by_training], ":", color="gray",
               label=f"{GOAL_SECAGG_RATIO} x plain (goal)")
    times.set_ylabel("round, s (mean of the run's rounds)")
    times.legend()
    ratios.plot(x, [pair["secagg_ratio"] for pair in by_training], "s-", color="C1", label="measured")
    ratios.plot(x, [pair["secagg_ratio_equal_training"] for pair in by_training], "x--", color="C2",
                label="derived: plain arm's training + each arm's overhead")
    ratios.axhline(GOAL_SECAGG_RATIO, linestyle=":", color="gray", label=f"goal {GOAL_SECAGG_RATIO}")
    ratios.legend(fontsize="small")
    for pair, at in zip(by_training, x, strict=True):
        ratios.annotate(f"{pair['secagg_ratio']:.2f}", (at, pair["secagg_ratio"]), textcoords="offset points",
                        xytext=(4, 4))
    ratios.set_ylabel("SecAgg+ round / plain round")
    ratios.set_ylim(bottom=1.0)
    for axes in (times, ratios):
        axes.set_xlabel("slowest site's training per round (plain arm), s")
        axes.grid(alpha=0.3)
    figure.suptitle("round_overhead: 3 sites on one 2-core machine, TLS, pull relay on")
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=110))
