"""What the released global model gives away about who trained it, without DP and with DP at ε = 3.

A loss-threshold membership-inference attack (Yeom et al., 2018; ``simulations/membership_inference.py``)
against the final global model of a simulated federation on Flower's Simulation Engine. Members:
the training tiles of the sites; non-members: the held-out test tiles of the same source and
classes. The setting is chosen so that a non-private model overfits where an attacker can see it:
real colorectal tiles (adenocarcinoma against adenoma) of the evaluation part of crc-tiles, on the
trunk pretrained on its other part and pinned (``benchmarks/_crc_trunk.py``, as ``fed_vs_central``),
one tile per item (the privacy unit), half held out, dealt IID to 3 sites, and 100 epochs in all
(5 rounds x 20 local epochs), with fedpath's DP defaults for the model and the server (frozen
projection, server momentum: ``fed_vs_central.DEFAULTS``) but small batches. With the frozen
projection few weights train and the model barely overfits, which leaves the attack little to find
even without DP; so a second pair of arms trains the projection at every site (``*_trainable_projection``),
where the non-private model does overfit, to show DP stopping an attack that works. The two arms of a
pair are the same cell of an experiment but for DP, each run with ``SEEDS`` seeds (split, dealing, training):
the attack AUC is the mean over seeds with a 95 % bootstrap interval (members and non-members
resampled within each seed, ``simulations.membership_inference.mean_auc_interval``). The goal holds when, with DP, the
interval's upper end is at most ``GOAL_AUC_DP_HIGH`` and the mean at most ``GOAL_AUC_DP``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from benchmarks._crc_trunk import CRC_TILES, FULL, QUICK, pretrained_trunk
from benchmarks.fed_vs_central import GROUP_SIZE, STORE, crc_simulation
from simulations.experiment import epsilon_spent
from simulations.experiment_config import Cell, cell_config
from simulations.materialise import materialise
from simulations.membership_inference import attack_auc, checkpoint_scores, mean_auc_interval
from simulations.sim_config import parse_sim_config
from simulations.sim_runner import evaluate_checkpoint, run_simulation

SEEDS = (0, 1, 2)
EPSILON = 3.0
GOAL_AUC_DP = 0.55  # the mean over seeds, with DP
GOAL_AUC_DP_HIGH = 0.6  # the 95 % interval's upper end, with DP


def _arm(base, dp: bool, sites: int, root: Path) -> dict:
    """One arm (DP on or off) over every seed: per-seed attacks, the mean AUC and its interval, for the
    loss attack (the headline, as the goal was set) and the logit-margin attack (``margin_*``)."""
    runs, margin_runs, per_seed = [], [], []
    for seed in SEEDS:
        sim = cell_config(base, Cell(strategy="fedavg", dp=dp, epsilon=EPSILON if dp else None, seed=seed, sites=sites))
        folder = root / f"{'dp' if dp else 'no_dp'}-seed{seed}"
        layout = materialise(sim, folder, progress=False)
        run_dir = run_simulation(sim, layout, folder)
        final = run_dir / "checkpoints" / "latest.npz"
        scores = checkpoint_scores(final, layout)
        members, non_members = scores["loss"]
        runs.append((members, non_members))
        margin_runs.append(scores["margin"])
        per_seed.append({"seed": seed, "auc": round(attack_auc(members, non_members), 4),
                         "margin_auc": round(attack_auc(*margin_runs[-1]), 4), "members": len(members),
                         "non_members": len(non_members), "member_loss": round(float(members.mean()), 4),
                         "non_member_loss": round(float(non_members.mean()), 4),
                         "test_accuracy": round(evaluate_checkpoint(final, layout)["accuracy"], 4),
                         "epsilon": epsilon_spent(run_dir)})
    mean, low, high = mean_auc_interval(runs)
    margin_mean, margin_low, margin_high = mean_auc_interval(margin_runs)
    return {"auc_mean": round(mean, 4), "auc_95_low": round(low, 4), "auc_95_high": round(high, 4),
            "margin_auc_mean": round(margin_mean, 4), "margin_auc_95_low": round(margin_low, 4),
            "margin_auc_95_high": round(margin_high, 4), "per_seed": per_seed}


def run(quick: bool) -> dict:
    if not CRC_TILES.is_dir():
        return {"skipped": f"data folder absent: {CRC_TILES}"}
    logging.getLogger("fedpath.site").setLevel(logging.ERROR)
    trunk = pretrained_trunk(QUICK if quick else FULL)
    # 120 items of each class: about 95 members and 120 non-members per seed, within what 2 shared
    # cores train 2 arms x 3 seeds x 100 epochs on in well under an hour.
    sites, per_class, rounds, epochs = (3, 12, 2, 10) if quick else (3, 120, 5, 20)
    training = {"batch_size": 8, "learning_rate": 1e-3}  # small batches, many steps: room to overfit
    arms = {}
    with tempfile.TemporaryDirectory() as tmp:
        for frozen, suffix in ((True, ""), (False, "_trainable_projection")):
            document = crc_simulation(trunk, STORE, sites, rounds, epochs, per_class, {"scheme": "iid"}, training,
                                      GROUP_SIZE)
            document["model"]["frozen_projection"] = frozen
            document["simulation"]["test_fraction"] = 0.5
            base = parse_sim_config(document, "membership_inference")
            for name, dp in (("no_dp", False), ("dp", True)):
                arms[name + suffix] = _arm(base, dp, sites, Path(tmp) / (name + suffix))
                arm = arms[name + suffix]
                print(f"membership_inference {name + suffix}: loss attack AUC {arm['auc_mean']:.3f}, margin attack "
                      f"{arm['margin_auc_mean']:.3f} [{arm['margin_auc_95_low']:.3f}, {arm['margin_auc_95_high']:.3f}]",
                      flush=True)
    dp = arms["dp"]
    return {"epsilon": EPSILON, "auc_no_dp": arms["no_dp"]["auc_mean"], "auc_dp": dp["auc_mean"],
            "auc_dp_95": [dp["auc_95_low"], dp["auc_95_high"]],
            "auc_no_dp_95": [arms["no_dp"]["auc_95_low"], arms["no_dp"]["auc_95_high"]],
            "goal_auc_dp_max": GOAL_AUC_DP, "goal_auc_dp_95_high_max": GOAL_AUC_DP_HIGH,
            "goal_met": dp["auc_mean"] <= GOAL_AUC_DP and dp["auc_95_high"] <= GOAL_AUC_DP_HIGH,
            "margin_goal_met": dp["margin_auc_mean"] <= GOAL_AUC_DP and dp["margin_auc_95_high"] <= GOAL_AUC_DP_HIGH,
            "arms_trainable_projection": "the same with the projection trained at every site (more private weights, "
                                         "the setting that overfits without DP): does DP stop an attack that works?",
            "seeds": list(SEEDS), "interval": "95 % percentile bootstrap of the mean over seeds, 2000 draws",
            "tile_size": trunk.plan.settings.tile_size, "group_size": GROUP_SIZE, "sites": sites,
            "items_per_class": per_class, "test_fraction": 0.5, "rounds": rounds, "local_epochs": epochs,
            **{f"training_{k}": v for k, v in training.items()}, "attack": "loss threshold (score -loss), ROC AUC",
            "trunk": "pretrained on the pretraining part of crc-tiles, pinned", **trunk.summary(), **arms}
