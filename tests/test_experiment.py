"""simulations.experiment_config and simulations.experiment: the grid, its validation, and a tiny run."""

from pathlib import Path

import pytest
import yaml

from shared.yaml_config import ConfigError
from simulations.experiment_config import cell_config, load_experiment_config

BASE = {"classes": ["adenoma", "adenocarcinoma"], "federation": {"rounds": 2, "min_sites": 2},
        "simulation": {"sites": 3, "data": {"source": "generated", "generated": {"slides": 12, "size": 512}}}}


def _write(folder: Path, document: dict, name: str = "exp.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(document))
    return path


def test_grid_expansion_and_names(tmp_path):
    path = _write(tmp_path, {"name": "skew study", "base": BASE, "grid": {
        "strategy": ["fedavg", "fedprox"], "proximal_mu": [0.01, 0.1], "dp": [False, True], "epsilon": [1, 8],
        "alpha": [0.1, 1.0], "sites": [2, 4], "seeds": [0, 1]}})
    config = load_experiment_config(path)
    cells = config.cells()
    # per (sites, alpha, privacy in {no DP, ε=1, ε=8}, seed): fedavg + 2 fedprox + centralised + local
    assert len(cells) == 2 * 2 * 3 * 2 * 5
    names = [cell.name for cell in cells]
    assert len(set(names)) == len(names)
    assert "fedavg_nodp_alpha0.1_sites2_seed0" in names
    assert "fedprox-mu0.1_dp-eps8_alpha1_sites4_seed1" in names
    assert "centralised_dp-eps1_alpha0.1_sites2_seed0" in names and "local_nodp_alpha1_sites4_seed1" in names
    assert not any("mu" in c.name for c in cells if c.strategy != "fedprox")  # μ multiplies FedProx only
    assert not any("eps" in c.name for c in cells if not c.dp)  # ε multiplies DP cells only
    assert config.out_dir == tmp_path / "experiments" / "skew-study"
    assert config.sim.simulation.features.cache_dir == tmp_path / "cache"

    cell = next(c for c in cells if c.name == "fedprox-mu0.1_dp-eps8_alpha1_sites4_seed1")
    assert cell.setting == "fedprox-mu0.1_dp-eps8_alpha1_sites4"
    sim = cell_config(config.sim, cell)
    assert (sim.strategy.name, sim.strategy.proximal_mu) == ("fedprox", 0.1)
    assert (sim.privacy.required, sim.privacy.epsilon, sim.simulation.site_privacy.enabled) == (True, 8.0, True)
    assert (sim.simulation.partition.scheme, sim.simulation.partition.alpha) == ("dirichlet", 1.0)
    assert (sim.simulation.sites, sim.simulation.seed, sim.training.seed) == (4, 1, 1)
    off = cell_config(config.sim, next(c for c in cells if c.name == "fedavg_nodp_alpha0.1_sites2_seed0"))
    assert (off.privacy.required, off.simulation.site_privacy.enabled, off.strategy.name) == (False, False, "fedavg")


def test_an_inline_base_takes_relative_paths_from_the_experiment_files_folder(tmp_path, monkeypatch):
    """As a sim.yaml of its own would: the trunk weights as well as the feature store (the weights stayed
    relative to wherever the command ran)."""
    base = {**BASE, "simulation": {**BASE["simulation"], "features": {"backbone_weights": "weights/trunk.pth"}}}
    (tmp_path / "study").mkdir()
    path = _write(tmp_path / "study", {"name": "w", "base": base})
    monkeypatch.chdir(tmp_path)  # elsewhere than the file
    features = load_experiment_config(path).sim.simulation.features
    assert features.backbone_weights == str(tmp_path / "study" / "weights" / "trunk.pth")
    assert features.cache_dir == tmp_path / "study" / "cache"


def test_empty_axes_take_the_base_values(tmp_path):
    base = {**BASE, "simulation": {**BASE["simulation"], "partition": {"scheme": "iid"}}}
    (tmp_path / "sim.yaml").write_text(yaml.safe_dump(base))
    config = load_experiment_config(_write(tmp_path, {"base_file": "sim.yaml", "baselines": {"local": False}}))
    assert [c.name for c in config.cells()] == ["fedavg_dp-eps8_sites3_seed0", "centralised_dp-eps8_sites3_seed0"]


def test_cells_share_the_virtual_hospitals_of_their_data_setting(tmp_path):
    from simulations.experiment import data_setting

    path = _write(tmp_path, {"base": BASE, "grid": {"strategy": ["fedavg", "fedprox"], "dp": [False, True],
                                                    "alpha": [0.5], "seeds": [0, 1]}})
    config = load_experiment_config(path)
    settings = {}
    for cell in config.cells():
        settings.setdefault(data_setting(cell_config(config.sim, cell)), []).append(cell)
    assert len(settings) == 4  # (no DP, DP) x 2 seeds: strategies and baselines share their hospitals
    assert all(len(cells) == 4 and len({(c.dp, c.seed) for c in cells}) == 1 for cells in settings.values())
    assert sorted(name.rsplit("-", 1)[0] for name in settings) == [
        "sites3_alpha0.5_seed0_dp", "sites3_alpha0.5_seed0_nodp", "sites3_alpha0.5_seed1_dp",
        "sites3_alpha0.5_seed1_nodp"]


def test_saved_rounds_and_epsilon_spent(tmp_path):
    import numpy as np

    from shared.checkpoints import save_checkpoint, saved_rounds
    from simulations.experiment import epsilon_spent

    for round_, spent in ((2, {"a": 3.0, "b": 4.5}), (1, {"a": 1.0}), (10, {"a": 7.9, "b": 6.0})):
        card = {"privacy": {site: {"epsilon": eps, "delta": 1e-5} for site, eps in spent.items()}}
        save_checkpoint(tmp_path, round_, {"w": np.zeros(2, np.float32)}, card, best=False)
    assert [r for r, _ in saved_rounds(tmp_path)] == [1, 2, 10]  # latest.npz is not a round
    assert epsilon_spent(tmp_path) == 7.9
    save_checkpoint(tmp_path, 11, {"w": np.zeros(2, np.float32)}, {"privacy": {}}, best=False)
    assert epsilon_spent(tmp_path) is None  # no DP: no site recorded ε


@pytest.mark.parametrize("document, message", [
    ({"grid": {}}, "set exactly one of 'base_file'"),
    ({"base": BASE, "grid": {"strategy": ["fedavg", "krum"]}}, "grid.strategy.1: must be one of 'fedavg', 'fedprox'"),
    ({"base": BASE, "grid": {"alpha": [0.5, -1]}}, "grid.alpha: every value must be > 0"),
    ({"base": BASE, "grid": {"seeds": []}}, "grid.seeds: needs at least one value"),
    ({"base": BASE, "grid": {"epsilon": [8, 8]}}, "grid.epsilon: lists a value twice"),
    ({"base": BASE, "grid": {"sites": [1, 3]}}, "grid cell fedavg_dp-eps8_sites1_seed0: federation.min_sites: 2 "
                                                 "exceeds simulation.sites (1)"),
    ({"base": BASE, "grdi": {}}, "grdi: unknown setting (did you mean 'grid'?)"),
    ({"base": {**BASE, "simulation": {"sites": 0}}}, "base.simulation.sites: must be >= 1"),
])
def test_invalid_configs_name_the_key(tmp_path, document, message):
    with pytest.raises(ConfigError, match=None) as error:
        load_experiment_config(_write(tmp_path, document))
    assert message in str(error.value)
    assert str(tmp_path / "exp.yaml") in str(error.value)


def test_missing_base_file(tmp_path):
    with pytest.raises(ConfigError, match="sim.yaml: config file not found"):
        load_experiment_config(_write(tmp_path, {"base_file": "sim.yaml"}))


def _hand_made_layout(prepared_hospitals, tmp_path):
    """Two prepared hospitals as the sites (the first also as the pooled data) and the third as
    the held-out test set: its manifest marked split=test and prepared again (all from cache)."""
    import csv

    from client.prepare import prepare_site
    from client.site_config import load_site_config
    from simulations.materialise import SimLayout
    from tests.conftest import FEDERATION_CLASSES, copy_hospitals

    sites = copy_hospitals(prepared_hospitals, tmp_path, 3)
    manifest = sites[2].parent / "manifest.csv"
    with manifest.open(newline="") as handle:
        rows = [{**row, "split": "test"} for row in csv.DictReader(handle)]
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = prepare_site(load_site_config(sites[2]), progress=False)
    assert summary.count("cached") == len(rows)
    return SimLayout(tmp_path, tuple(sites[:2]), sites[0], sites[2], tuple(FEDERATION_CLASSES))


def test_baselines_on_prepared_sites(prepared_hospitals, tmp_path):
    """Centralised and local-only models under DP, scored on the held-out site like a federated checkpoint."""
    from client.feature_cache import FeatureCache
    from client.sequence_data import load_split
    from client.site_config import load_site_config
    from shared.model import ModelConfig
    from shared.run_config import TrainingConfig
    from simulations.baselines import BaselinePlan, centralised, local_only
    from simulations.membership_inference import attack_checkpoint

    layout = _hand_made_layout(prepared_hospitals, tmp_path)
    plan = BaselinePlan(classes=layout.classes, model=ModelConfig(core="mean"), sequence_length=4,
                        training=TrainingConfig(epochs=2, batch_size=2, learning_rate=0.01), dp=True, epsilon=8.0,
                        delta=1e-5, positive_class="adenocarcinoma")
    central = centralised(layout, plan, tmp_path / "central")
    assert 0 <= central["accuracy"] <= 1 and 0 < central["epsilon"] <= 8.0
    assert {"auc", "sensitivity", "specificity", "loss"} <= set(central)
    assert (tmp_path / "central" / "checkpoints" / "round-0000.json").is_file()  # scored as a checkpoint
    assert (tmp_path / "central" / "privacy_ledger.json").is_file()

    # The membership attack reads the same layout: the sites' training items against the test items.
    attack = attack_checkpoint(tmp_path / "central" / "checkpoints" / "round-0000.npz", layout)
    trained = sum(len(load_split(FeatureCache(load_site_config(p).features.cache_dir), "train")[0])
                  for p in layout.site_configs)
    assert (attack.members, attack.non_members) == (trained, 5) and 0 <= attack.auc <= 1

    local = local_only(layout, plan, tmp_path / "local")
    assert sorted(local["per_site"]) == ["site-1", "site-2"]
    accuracies = [site["accuracy"] for site in local["per_site"].values()]
    assert local["accuracy"] == pytest.approx(sum(accuracies) / 2)
    assert local["epsilon"] == max(site["epsilon"] for site in local["per_site"].values())


def test_command_reports_a_bad_grid_without_running(tmp_path, capsys):
    from simulations.cli import main

    path = _write(tmp_path, {"base": BASE, "grid": {"dp": [True], "epsilon": [0]}})
    assert main(["experiment", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "grid.epsilon: every value must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
