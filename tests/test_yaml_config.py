from pathlib import Path

import pytest

from client.site_config import load_site_config
from shared.yaml_config import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


def test_valid_config_resolves_paths_relative_to_the_file(tmp_path):
    config = load_site_config(write(tmp_path, "name: a\ndata:\n  manifest: m.csv\ntiling:\n  tile_size: 128\n"))
    assert config.data.manifest == tmp_path.resolve() / "m.csv"
    assert config.tiling.tile_size == 128
    assert config.tiling.target_mpp == 0.5  # default
    assert config.features.cache_dir == tmp_path.resolve() / "cache"
    assert config.features.backbone_weights == "random"


def test_local_weights_path_is_resolved(tmp_path):
    text = "name: a\ndata: {manifest: m.csv}\nfeatures: {backbone_weights: w/t.pth}\n"
    config = load_site_config(write(tmp_path, text))
    assert config.features.backbone_weights == str(tmp_path.resolve() / "w" / "t.pth")


def test_unknown_key_names_line_and_suggests(tmp_path):
    path = write(tmp_path, "name: a\ndata:\n  manifest: m.csv\ntiling:\n  tile_sise: 128\n")
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    assert f"{path}:5: tiling.tile_sise: unknown setting (did you mean 'tile_size'?)" in str(err.value)


def test_every_problem_reported_at_once(tmp_path):
    path = write(tmp_path, "name: a\ndata:\n  manifest: m.csv\n  val_fraction: 1.5\ntiling:\n  tile_size: ten\n")
    message = str(pytest.raises(ConfigError, load_site_config, path).value)
    assert ":4: data.val_fraction: must be between 0 and 1 (got 1.5)" in message
    assert ":6: tiling.tile_size: expected an integer, got 'ten'" in message


def test_missing_required_and_cross_field_rule(tmp_path):
    message = str(pytest.raises(ConfigError, load_site_config, write(tmp_path, "data: {}\n")).value)
    assert "name: required setting is missing" in message
    assert "set exactly one of 'manifest'" in message


def test_a_cross_field_rule_names_the_line_of_the_setting_it_is_about(tmp_path):
    path = write(tmp_path, "name: a\ndata:\n  manifest: m.csv\n  labels: [x, y, x]\ndisclose: [epsilon, loss]\n")
    message = str(pytest.raises(ConfigError, load_site_config, path).value)
    assert f"{path}:4: data.labels: class names must be unique" in message
    path = write(tmp_path, "name: a\ndata: {manifest: m.csv}\ndisclose: [epsilon, loss]\n")
    message = str(pytest.raises(ConfigError, load_site_config, path).value)
    assert f"{path}:3: disclose: ['loss'] cannot be disclosed" in message


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, "name: a\ndata:\n  manifest: [m.csv\n")
    message = str(pytest.raises(ConfigError, load_site_config, path).value)
    assert message.startswith(f"{path}:") and "YAML syntax error" in message


def test_a_key_given_twice_is_refused_not_silently_replaced(tmp_path):
    """YAML keeps the last of a repeated key: a second `privacy:` block would turn DP off without a word."""
    path = write(tmp_path, "name: a\ndata: {manifest: m.csv}\nprivacy:\n  enabled: true\n  epsilon: 4.0\n"
                           "federation: {}\nprivacy:\n  enabled: false\n")
    message = str(pytest.raises(ConfigError, load_site_config, path).value)
    assert f"{path}:7: privacy: given twice (first on line 3)" in message
    path = write(tmp_path, "name: a\ndata:\n  manifest: m.csv\n  manifest: n.csv\n")
    assert f"{path}:4: data.manifest: given twice (first on line 3)" in str(
        pytest.raises(ConfigError, load_site_config, path).value)


def test_a_number_in_exponent_form_without_a_dot_is_a_number(tmp_path):
    """YAML 1.1 reads 1e-5 as text (it wants 1.0e-5); a hospital writes what it means."""
    text = "name: a\ndata: {manifest: m.csv}\nprivacy: {delta: 1e-5, epsilon: 8E0}\n"
    config = load_site_config(write(tmp_path, text))
    assert config.privacy.delta == 1e-5 and config.privacy.epsilon == 8.0
    path = write(tmp_path, "name: a\ndata: {manifest: m.csv}\nprivacy: {delta: 1e-5x}\n")
    message = str(pytest.raises(ConfigError, load_site_config, path).value)
    assert "privacy.delta: expected a number, got '1e-5x'" in message


def test_a_file_where_a_folder_goes_is_refused_at_its_line(tmp_path):
    """`prepare` or `keygen` would otherwise fail mid-work with NotADirectoryError."""
    (tmp_path / "notes.txt").write_text("not a folder")
    path = write(tmp_path, "name: a\ndata: {manifest: m.csv}\nfeatures:\n  cache_dir: notes.txt\n"
                           "state_dir: notes.txt\ntraining: {out_dir: notes.txt}\n")
    message = str(pytest.raises(ConfigError, load_site_config, path).value)
    for line, key in ((4, "features.cache_dir"), (5, "state_dir"), (6, "training.out_dir")):
        assert f"{path}:{line}: {key}: {tmp_path / 'notes.txt'} is a file, not a folder" in message


def test_a_tile_resolution_no_scanner_has_is_refused(tmp_path):
    """1e-9 µm/px passed and planned 26,773 'tiles' on a 300 x 224 slide: upsampling, not tiling."""
    path = write(tmp_path, "name: a\ndata: {manifest: m.csv}\ntiling: {target_mpp: 0.000000001}\n")
    assert f"{path}:3: tiling.target_mpp: must be between 0.05 and 100.0" in str(
        pytest.raises(ConfigError, load_site_config, path).value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_site_config(tmp_path / "nope.yaml")


def test_bool_is_not_an_integer(tmp_path):
    path = write(tmp_path, "name: a\ndata: {manifest: m.csv}\nsequences: {length: true}\n")
    with pytest.raises(ConfigError, match="sequences.length: expected an integer, got True"):
        load_site_config(path)


def test_example_site_config_is_valid():
    config = load_site_config(Path(__file__).resolve().parents[1] / "configs" / "site.example.yaml")
    assert config.name == "hospital-a" and config.data.labels == ("adenoma", "adenocarcinoma")


def test_example_server_and_sim_configs_are_valid():
    from server.server_config import load_server_config
    from simulations.sim_config import load_sim_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    server = load_server_config(configs / "server.example.yaml")
    assert server.model.frozen_projection and server.strategy.server_optimizer.name == "momentum"
    assert load_sim_config(configs / "sim.example.yaml").strategy.server_optimizer.name == "momentum"
