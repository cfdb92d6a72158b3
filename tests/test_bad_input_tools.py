"""Bad input to the researcher's and admin's tools gets one clear line and exit 2, and nothing is written:
`fedpath-sim make-slides` and `split`, sim.yaml's seed, `fedpath-server dashboard --port`,
`pretrain-encoder`'s numbers, and `init --days`."""

from __future__ import annotations

import numpy as np
import pytest
import uvicorn
from PIL import Image

from client.site_config import load_site_config
from server.cli import main as server_main
from simulations.cli import main as sim_main


def listing(folder):
    """Every file under ``folder`` with its bytes: what a refused command must leave as it was."""
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def usage_error(capsys, argv) -> str:
    """argparse's refusal of ``argv`` (exit 2): its message."""
    with pytest.raises(SystemExit) as exit_info:
        sim_main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


TINY = ["--sites", "1", "--slides-per-site", "1", "--size", "64", "--fixed-size"]


# --------------------------------------------------------------------------- make-slides options


@pytest.mark.parametrize("option, value, message", [
    ("--seed", "-1", "argument --seed: -1: must be at least 0"),
    ("--sites", "0", "argument --sites: 0: must be at least 1"),
    ("--sites", "-2", "argument --sites: -2: must be at least 1"),
    ("--slides-per-site", "0", "argument --slides-per-site: 0: must be at least 1"),
    ("--sites", "two", "argument --sites: 'two' is not a whole number"),
    ("--tile-size", "0", "argument --tile-size: 0: must be >= 75, as site.yaml's tiling.tile_size"),
    ("--tile-size", "10", "argument --tile-size: 10: must be >= 75, as site.yaml's tiling.tile_size"),
])
def test_make_slides_refuses_bad_numbers_naming_the_option(tmp_path, capsys, option, value, message):
    assert message in usage_error(capsys, ["make-slides", "--out", str(tmp_path / "out"), option, value])
    assert list(tmp_path.iterdir()) == []


def test_make_slides_writes_a_site_yaml_the_site_accepts_at_the_smallest_tile_size(tmp_path, capsys):
    assert sim_main(["make-slides", "--out", str(tmp_path), *TINY, "--tile-size", "75"]) == 0
    assert load_site_config(tmp_path / "site-1" / "site.yaml").tiling.tile_size == 75


def test_a_negative_seed_in_sim_yaml_is_refused_at_its_line(tmp_path, capsys):
    (tmp_path / "sim.yaml").write_text("classes: [adenoma, adenocarcinoma]\nsimulation:\n  seed: -1\n")
    assert sim_main(["split", "--config", str(tmp_path / "sim.yaml")]) == 2
    assert "sim.yaml:3: simulation.seed: must be >= 0 (got -1)" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == ["sim.yaml"]


# --------------------------------------------------------------------------- --out a file


@pytest.mark.parametrize("below", ["", "sub"])
def test_make_slides_into_a_file_is_refused(tmp_path, capsys, below):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    out = blocker / below if below else blocker
    assert sim_main(["make-slides", "--out", str(out), *TINY]) == 2
    assert f"--out {out}: {blocker} is a file, not a folder" in capsys.readouterr().err
    assert listing(tmp_path) == {blocker: b"mine"}


def test_split_into_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "sim.yaml").write_text("classes: [adenoma, adenocarcinoma]\n")
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    assert sim_main(["split", "--config", str(tmp_path / "sim.yaml"), "--out", str(blocker)]) == 2
    assert f"--out {blocker}: {blocker} is a file, not a folder" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt", "sim.yaml"]
    assert blocker.read_text() == "mine"


# --------------------------------------------------------------------------- make-slides twice


def test_make_slides_keeps_hospitals_already_there_unless_forced(tmp_path, capsys):
    assert sim_main(["make-slides", "--out", str(tmp_path), *TINY]) == 0
    site_yaml = tmp_path / "site-1" / "site.yaml"
    site_yaml.write_text(site_yaml.read_text() + "# edited by hand\n")
    before = listing(tmp_path)
    capsys.readouterr()
    assert sim_main(["make-slides", "--out", str(tmp_path), *TINY, "--seed", "9"]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path}: hospital folder(s) site-1 already hold a site.yaml or manifest.csv" in err
    assert "Pass --force to replace them" in err
    assert listing(tmp_path) == before
    assert sim_main(["make-slides", "--out", str(tmp_path), *TINY, "--seed", "9", "--force"]) == 0
    assert "edited by hand" not in site_yaml.read_text()


# --------------------------------------------------------------------------- dashboard --port


@pytest.mark.parametrize("port", ["70000", "0", "-1"])
def test_dashboard_refuses_a_port_outside_the_tcp_range(tmp_path, capsys, monkeypatch, port):
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: served.append(kwargs))
    (tmp_path / "server.yaml").write_text("classes: [adenoma, adenocarcinoma]\n")
    argv = ["dashboard", "--config", str(tmp_path / "server.yaml"), "--no-superlink", "--port"]
    assert server_main([*argv, port]) == 2
    assert f"--port {port}: must be a TCP port (1-65535)" in capsys.readouterr().err
    assert served == [] and [path.name for path in tmp_path.iterdir()] == ["server.yaml"]
    assert server_main([*argv, "65535"]) == 0 and served[0]["port"] == 65535


# --------------------------------------------------------------------------- pretrain-encoder


def make_tiles(root):
    rng = np.random.default_rng(0)
    for name, colour in (("pink", (230, 150, 190)), ("purple", (120, 70, 160))):
        (root / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (80, 80, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("option, value, message", [
    ("--projection", "-4", "projection size (--projection) -4: must be >= 0 (0: none)"),
    ("--lr", "nan", "learning rate (--lr) nan: must be a finite number > 0"),
    ("--lr", "inf", "learning rate (--lr) inf: must be a finite number > 0"),
    ("--lr", "0", "learning rate (--lr) 0.0: must be a finite number > 0"),
    ("--seed", "-1", "seed (--seed) -1: must be between 0 and 4294967295"),
    ("--mpp", "nan", "µm per pixel (--mpp) nan: must be a finite number > 0"),
    ("--workers", "-1", "tile-reading processes (--workers) -1: must be >= 0"),
])
def test_pretrain_encoder_refuses_bad_numbers_before_any_work(tmp_path, capsys, option, value, message):
    tiles = make_tiles(tmp_path / "tiles")
    out = tmp_path / "trunk" / "encoder.pth"
    code = server_main(["pretrain-encoder", "--tiles", str(tiles), "--out", str(out), "--tile-size", "75",
                        "--epochs", "1", "--batch-size", "4", "--val-fraction", "0.25", "--workers", "0",
                        "--no-progress", option, value])
    assert code == 2
    assert message in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiles"]


# --------------------------------------------------------------------------- init --days, --force


def test_init_refuses_days_beyond_a_hundred_years(tmp_path, capsys):
    out = tmp_path / "certs"
    assert server_main(["init", "--name", "superlink", "--out", str(out), "--days", "99999999"]) == 2
    assert ("certificate validity --days 99999999: must be a whole number of days, at least 1 and at most 36500 "
            "(100 years)") in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert server_main(["init", "--name", "superlink", "--out", str(out), "--days", "36500"]) == 0
    assert server_main(["renew-cert", "--name", "superlink", "--out", str(out), "--days", "99999999"]) == 2
    assert "at most 36500" in capsys.readouterr().err


def test_init_names_the_force_option(tmp_path, capsys):
    assert server_main(["init", "--name", "superlink", "--out", str(tmp_path)]) == 0
    before = listing(tmp_path)
    capsys.readouterr()
    assert server_main(["init", "--name", "superlink", "--out", str(tmp_path)]) == 2
    assert "Pass --force to replace them" in capsys.readouterr().err
    assert listing(tmp_path) == before
