"""`fedpath-site prepare` and `check` on real files: generated slides always, handout slides when present."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import client.prepare as prepare_module
from client.cli import main as site_main
from client.feature_cache import FeatureCache
from client.prepare import prepare_site
from client.site_config import load_site_config
from simulations.slide_generator import write_pyramid_tiff
from tests.conftest import CRC_TILES, REAL_SLIDES, requires_crc_tiles, requires_real_slides, write_site_yaml


@pytest.fixture
def site(tmp_path, generated_manifests):
    """A copy of one generated site (tests modify files)."""
    folder = tmp_path / "site"
    shutil.copytree(generated_manifests[0].parent, folder)
    return write_site_yaml(folder, {"manifest": "manifest.csv"})


def test_prepare_caches_every_slide_then_reuses(site):
    config = load_site_config(site)
    first = prepare_site(config, progress=False)
    assert first.count("new") == 4 and first.count("skipped") == 0
    assert first.new_tiles == first.tiles > 0
    cache = FeatureCache(config.features.cache_dir)
    index = cache.read_index()
    assert set(index.items) == {f"slides/slide-00{i}.tif" for i in range(1, 5)}
    assert index.classes == ["adenocarcinoma", "adenoma"]  # no labels configured: sorted
    some = index.items["slides/slide-001.tif"]
    entry = cache.load(some["key"])
    assert entry.features.shape == (some["tiles"], 2048) and np.isfinite(entry.features).all()
    footprint = entry.meta["read"]["footprint"]
    np.testing.assert_array_equal(entry.coords, entry.cells * footprint)
    assert (np.abs(np.diff(entry.cells, axis=0)).sum(axis=1) <= 3).mean() > 0.8  # spatial order

    second = prepare_site(config, progress=False)
    assert second.count("cached") == 4 and second.new_tiles == 0


def test_changed_slide_recomputes_only_itself(site):
    config = load_site_config(site)
    prepare_site(config, progress=False)
    with (site.parent / "slides" / "slide-002.tif").open("ab") as handle:
        handle.write(b"\0")  # new bytes: a rescanned slide
    again = prepare_site(config, progress=False)
    assert {o.item.item_id: o.status for o in again.outcomes} == {
        "slides/slide-001.tif": "cached", "slides/slide-002.tif": "new",
        "slides/slide-003.tif": "cached", "slides/slide-004.tif": "cached"}


def test_changed_tiling_recomputes_everything(site):
    prepare_site(load_site_config(site), progress=False)
    changed = write_site_yaml(site.parent, {"manifest": "manifest.csv"}, tiling={"min_tissue": 0.6})
    assert prepare_site(load_site_config(changed), progress=False).count("new") == 4


def test_interrupted_run_resumes(site, monkeypatch):
    real = prepare_module.extract_features
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "extract_features", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_site(load_site_config(site), progress=False)
    monkeypatch.setattr(prepare_module, "extract_features", real)
    resumed = prepare_site(load_site_config(site), progress=False)
    assert resumed.count("cached") == 1 and resumed.count("new") == 3
    assert not list((site.parent / "cache").rglob("*.tmp"))


def test_bad_slides_are_skipped_and_the_rest_proceed(site, capsys):
    (site.parent / "slides" / "corrupt.tif").write_bytes(b"II*\0" + b"\xff" * 500)
    with (site.parent / "manifest.csv").open("a") as handle:
        handle.write("slides/corrupt.tif,adenoma,px\nslides/missing.tif,adenoma,py\n")
    assert site_main(["prepare", "--config", str(site), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "slides/corrupt.tif" in out and "not a whole-slide image" in out
    assert "slides/missing.tif" in out and "file not found" in out
    assert "4 new, 0 from cache, 2 skipped" in out


def test_check_reports_every_kind_of_problem(site, capsys):
    slides = site.parent / "slides"
    shutil.copy(slides / "slide-001.tif", slides / "copy.tif")
    write_pyramid_tiff(slides / "blank.tif", np.full((512, 512, 3), 241, np.uint8), mpp=0.5)
    (site.parent / "manifest.csv").write_text(
        "slide,label,patient,split\n"
        "slides/slide-001.tif,adenoma,p1,train\n"
        "slides/slide-002.tif,adenocarcinoma,p1,val\n"
        "slides/copy.tif,adenoma,p3,train\n"
        "slides/blank.tif,adenoma,p4,train\n"
        "slides/slide-003.tif,sarcoma,p5,train\n"
        "slides/gone.tif,adenoma,p6,train\n"
        "slides/zero.tif,adenoma,p7,train\n"
        "slides/zero2.tif,adenoma,p8,train\n")
    (slides / "zero.tif").write_bytes(b"")
    (slides / "zero2.tif").write_bytes(b"")  # two empty files are not copies of each other: each is said
    write_site_yaml(site.parent, {"manifest": "manifest.csv", "labels": ["adenoma", "adenocarcinoma"]})
    assert site_main(["check", "--config", str(site)]) == 1
    out = capsys.readouterr().out
    assert "duplicate: same content as slides/slide-001.tif" in out
    assert "same content as slides/zero.tif" not in out
    assert f"{slides / 'zero2.tif'}: " in out
    assert "no tissue" in out
    assert "unknown label 'sarcoma'" in out
    assert f"{slides / 'gone.tif'}: file not found" in out
    assert "patient p1 is in more than one split (train, val)" in out


def test_check_passes_a_clean_site(site, capsys):
    assert site_main(["check", "--config", str(site)]) == 0
    out = capsys.readouterr().out
    assert "0 error(s)" in out and "adenocarcinoma" in out


def test_bad_yaml_exits_2_with_key_and_line(tmp_path, capsys):
    path = tmp_path / "site.yaml"
    path.write_text("name: x\ndata:\n  manifest: m.csv\nfeatures:\n  batch_size: 0\n")
    assert site_main(["check", "--config", str(path)]) == 2
    assert f"{path}:5: features.batch_size: must be a number of tiles >= 1, or auto (got 0)" in capsys.readouterr().err


def test_console_commands_installed():
    for command in ("fedpath-site", "fedpath-server", "fedpath-sim"):
        exe = Path(sys.executable).parent / command
        result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "usage:" in result.stdout


@requires_real_slides
def test_real_slides(tmp_path):
    (tmp_path / "manifest.csv").write_text(
        "slide,label\n"
        f"{REAL_SLIDES / 'cmu-1-small-region.svs'},adenoma\n"
        f"{REAL_SLIDES / 'tcga-cr-7395-01a-01-ts1.svs'},adenocarcinoma\n"
        f"{REAL_SLIDES / 'broken.svs'},adenoma\n")
    without_override = write_site_yaml(tmp_path, {"manifest": "manifest.csv"})
    summary = prepare_site(load_site_config(without_override), progress=False)
    reasons = {Path(o.item.item_id).name: (o.status, o.reason) for o in summary.outcomes}
    assert reasons["cmu-1-small-region.svs"][0] == "new"
    assert reasons["tcga-cr-7395-01a-01-ts1.svs"] == (
        "skipped", "the slide records neither µm/px nor objective power; "
                   "set data.mpp_override in site.yaml to this scanner's µm/px")
    assert reasons["broken.svs"][0] == "skipped" and "not a whole-slide image" in reasons["broken.svs"][1]

    with_override = write_site_yaml(tmp_path, {"manifest": "manifest.csv", "mpp_override": 0.5})
    summary = prepare_site(load_site_config(with_override), progress=False)
    statuses = {Path(o.item.item_id).name: (o.status, o.tiles) for o in summary.outcomes}
    assert statuses["tcga-cr-7395-01a-01-ts1.svs"][0] == "new" and statuses["tcga-cr-7395-01a-01-ts1.svs"][1] > 50
    assert statuses["cmu-1-small-region.svs"][0] == "new"  # the override joins the key: recomputed


@requires_crc_tiles
def test_tile_folder_source(tmp_path):
    tiles = tmp_path / "tiles"
    for name in ("AC", "T"):
        (tiles / name).mkdir(parents=True)
        for source in sorted((CRC_TILES / name).iterdir())[:6]:
            (tiles / name / source.name).symlink_to(source)  # links, not copies of the handout
    config = load_site_config(write_site_yaml(tmp_path, {"tile_folder": "tiles", "group_size": 3},
                                              tiling={"tile_size": 96}))
    summary = prepare_site(config, progress=False)
    assert summary.count("new") == 4 and summary.tiles == 12
    index = FeatureCache(config.features.cache_dir).read_index()
    assert sorted(i["label"] for i in index.items.values()) == ["AC", "AC", "T", "T"]
