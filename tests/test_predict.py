"""`fedpath-site predict` end to end: a head trained on generated slides, a checkpoint written by the
run recorder, real OpenSlide reads; the heatmap must find the tumour where the generator put it."""

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from client.cli import main
from client.feature_cache import FeatureCache
from client.heatmap import render_heatmap
from client.prepare import prepare_site
from client.sequence_data import load_split, predict_slides
from client.sequences import training_windows
from client.site_config import load_site_config
from server.run_folder import RunFolder
from server.run_recorder import RunRecorder
from shared.checkpoints import save_checkpoint
from shared.model import ModelConfig, build_head, build_trainable
from shared.parameters import load_arrays, model_arrays
from simulations.slide_generator import SlideSpec, Stain, make_slide
from tests.conftest import (
    FEDERATION_CLASSES,
    REAL_SLIDES,
    disclosed_site,
    record_round,
    requires_real_slides,
    write_site_yaml,
)

LENGTH = 8
HEAD = {"projection": 16, "hidden": 8}
REGION = (0.0, 0.0, 0.5, 1.0)  # the left half of the query slide is adenocarcinoma, the rest adenoma
QUERY = SlideSpec(width=1536, height=1024)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Four generated slides (two per class) prepared with the fast tiling, a head trained on their
    cached vectors until it separates them, saved by the run recorder; a query folder to predict."""
    root = tmp_path_factory.mktemp("predict")
    rows = ["slide,label,patient,split"]
    for i, label in enumerate(FEDERATION_CLASSES * 2):
        make_slide(root / "slides" / f"slide-{i}.tif", label, SlideSpec(1024, 1024), Stain(), np.random.default_rng(i))
        rows.append(f"slides/slide-{i}.tif,{label},p{i},train")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    site = write_site_yaml(root, {"manifest": "manifest.csv", "labels": FEDERATION_CLASSES}, model=HEAD)
    config = load_site_config(site)
    assert prepare_site(config, progress=False).count("new") == 4
    slides, classes = load_split(FeatureCache(config.features.cache_dir), "train")

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    head = build_head(ModelConfig(**HEAD), len(classes))
    sequences = torch.cat([torch.from_numpy(s.features[training_windows(len(s.features), LENGTH, 16, rng)])
                           for s in slides])
    labels = torch.tensor(np.repeat([s.label for s in slides], 16))
    optimizer = torch.optim.Adam(head.parameters(), lr=2e-3)
    for _ in range(120):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(sequences), labels).backward()
        optimizer.step()
    assert (predict_slides(head, slides, LENGTH).argmax(1) == [s.label for s in slides]).all()

    (root / "server.yaml").write_text(f"classes: {FEDERATION_CLASSES}\nmodel: {HEAD}\n"
                                      f"training: {{sequence_length: {LENGTH}}}\n")
    folder = RunFolder.create(root / "server.yaml")
    recorder = RunRecorder(folder, folder.config(), list(model_arrays(head)))
    record_round(recorder, 1, model_arrays(head).values(), {"north": disclosed_site(1.0)},
                 {"accuracy": 1.0, "auc": 1.0})

    query = root / "query"
    make_slide(query / "region.tif", "adenocarcinoma", QUERY, Stain(), np.random.default_rng(99), cancer_region=REGION)
    (query / "broken.svs").write_bytes(b"not a slide" * 100)
    (query / "notes.txt").write_text("not a slide suffix: never opened")
    return {"root": root, "site": site, "checkpoint": folder.path / "checkpoints" / "round-0001.npz",
            "query": query, "head": head, "slides": slides}


def test_predict_explains_where_the_tumour_is(trained, tmp_path, capsys):
    out = tmp_path / "out"
    cached = trained["root"] / "slides" / "slide-1.tif"
    code = main(["predict", "--model", str(trained["checkpoint"]), "--out", str(out), "--config", str(trained["site"]),
                 "--explain", "adenocarcinoma", "--no-progress", str(trained["query"]), str(cached)])
    assert code == 1  # broken.svs failed; the others were predicted
    assert "3 slides: 2 predicted, 1 failed" in capsys.readouterr().out

    summary = json.loads((out / "predictions.json").read_text())
    status = {s["name"]: s for s in summary["slides"]}
    assert set(status) == {"broken", "region", "slide-1"}
    assert status["broken"]["status"] == "failed" and "not a whole-slide image" in status["broken"]["reason"]
    assert status["region"]["features"] == "computed" and status["slide-1"]["features"] == "cache"
    with open(out / "predictions.csv", newline="") as handle:
        assert {row["name"]: row["status"] for row in csv.DictReader(handle)} == {
            "broken": "failed", "region": "ok", "slide-1": "ok"}
    assert not list(out.glob("broken.*"))

    # A prepared slide is classified from its cache entry exactly as evaluation scores it.
    evaluated = predict_slides(trained["head"], [trained["slides"][1]], LENGTH)[0]
    assert status["slide-1"]["probabilities"]["adenocarcinoma"] == pytest.approx(float(evaluated[1]), abs=1e-6)

    doc = json.loads((out / "region.json").read_text())
    assert doc["classes"] == FEDERATION_CLASSES and doc["explained_class"] == "adenocarcinoma"
    assert doc["predicted_class"] in FEDERATION_CLASSES and doc["checkpoint"]["round"] == 1
    assert doc["checkpoint"]["sha256"] == json.loads(trained["checkpoint"].with_suffix(".json").read_text())[
        "checkpoint_sha256"]
    assert sum(doc["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert isinstance(doc["tile_size"], int) and isinstance(doc["mpp"], float) and doc["tile_size"] == 96
    tiles = doc["tiles"]
    assert len(tiles) > 10
    for tile in tiles:
        assert set(tile) == {"x", "y", "w", "h", "importance", "probability"}
        assert all(isinstance(tile[k], int) for k in ("x", "y", "w", "h"))
        assert math.isfinite(tile["importance"]) and 0.0 <= tile["probability"] <= 1.0
    with open(out / "region.tiles.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(tiles) and float(rows[0]["importance"]) == pytest.approx(tiles[0]["importance"])

    thumb, overlay = Image.open(out / "region.thumbnail.png"), Image.open(out / "region.overlay.png")
    assert overlay.size == thumb.size == (doc["thumbnail"]["width"], doc["thumbnail"]["height"])
    assert max(overlay.size) == 1024
    # The heatmap is the overlay with a title and a colour bar: larger than the thumbnail.
    figure = Image.open(out / doc["heatmap"]["file"])
    assert figure.width > thumb.width and figure.height > thumb.height
    assert (out / doc["geojson"]).is_file() and doc["timing"]["geojson_s"] >= 0

    # Importances share out the slide's probability above chance, and the tumour half holds it.
    importance = np.array([t["importance"] for t in tiles])
    assert importance.sum() == pytest.approx(doc["probabilities"]["adenocarcinoma"] - 0.5, abs=1e-4)
    inside = np.array([t["x"] + t["w"] / 2 < REGION[2] * QUERY.width for t in tiles])
    assert 0 < inside.sum() < len(tiles)
    assert importance[inside].mean() > 0 > importance[~inside].mean()
    top = np.argsort(-importance)[:inside.sum()]
    assert inside[top].mean() >= 0.8
    probability = np.array([t["probability"] for t in tiles])
    assert probability[inside].mean() > probability[~inside].mean()


def test_a_tampered_checkpoint_is_refused(trained, tmp_path, capsys):
    copy = tmp_path / "model"
    copy.mkdir()
    for suffix in (".npz", ".json"):
        shutil.copy(trained["checkpoint"].with_suffix(suffix), copy / f"best{suffix}")
    data = bytearray((copy / "best.npz").read_bytes())
    data[-64] ^= 0xFF
    (copy / "best.npz").write_bytes(bytes(data))
    code = main(["predict", "--model", str(copy / "best.npz"), "--out", str(tmp_path / "out"), "--no-progress",
                 str(trained["query"])])
    assert code == 2
    assert "does not match its model card" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_trunk_is_refused(trained, tmp_path, capsys):
    card = json.loads(trained["checkpoint"].with_suffix(".json").read_text())
    arrays = dict(np.load(trained["checkpoint"]))
    pinned = {key: card[key] for key in ("classes", "sequence_length")}
    save_checkpoint(tmp_path / "run", 1, {name: arrays[name] for name in [p["name"] for p in card["parameters"]]},
                    {**pinned, "model": {**card["model"], "trunk_sha256": "ab" * 32}}, best=False)
    code = main(["predict", "--model", str(tmp_path / "run" / "checkpoints" / "latest.npz"), "--out",
                 str(tmp_path / "out"), "--no-progress", str(trained["query"])])
    assert code == 2
    assert "ab" * 32 in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_last_block_checkpoint_runs_its_own_block(trained, tmp_path):
    # Started from the random trunk's block and not moved: through the folded block, the slide's
    # vectors, hence its prediction, must be those of the trunk itself.
    config = ModelConfig(**HEAD, trainable="last_block")
    model = build_trainable(config, len(FEDERATION_CLASSES), "random")
    load_arrays(model.head, list(model_arrays(trained["head"]).values()))
    save_checkpoint(tmp_path / "run", 1, model_arrays(model), {"model": config.as_dict(), "classes": FEDERATION_CLASSES,
                                                               "sequence_length": LENGTH}, best=False)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(tmp_path / "run" / "checkpoints" / "latest.npz"), "--out", str(out),
                 "--config", str(trained["site"]), "--no-progress",
                 str(trained["root"] / "slides" / "slide-1.tif")]) == 0
    doc = json.loads((out / "slide-1.json").read_text())
    assert doc["features"] == "computed"  # the cached vectors never went through a fine-tuned block
    evaluated = predict_slides(trained["head"], [trained["slides"][1]], LENGTH)[0]
    assert doc["probabilities"]["adenocarcinoma"] == pytest.approx(float(evaluated[1]), abs=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_a_gpu_the_site_names_but_lacks_is_refused_before_any_slide_or_folder(trained, tmp_path, capsys):
    site = tmp_path / "site.yaml"
    document = yaml.safe_load(trained["site"].read_text())
    document["features"] = {**document.get("features", {}), "device": "cuda:0"}
    document["data"]["manifest"] = str(trained["root"] / "manifest.csv")  # the same prepared slides and cache
    site.write_text(yaml.safe_dump(document))
    config = load_site_config(site)
    runs = config.training.out_dir
    before = sorted(runs.iterdir()) if runs.exists() else []
    code = main(["predict", "--model", str(trained["checkpoint"]), "--out", str(tmp_path / "out"), "--config",
                 str(site), "--no-progress", str(trained["query"])])
    assert code == 2
    assert "features.device: cuda:0, but torch sees no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["train-local", "--config", str(site), "--no-progress"]) == 2
    assert "features.device: cuda:0, but torch sees no CUDA GPU" in capsys.readouterr().err
    assert (sorted(runs.iterdir()) if runs.exists() else []) == before  # no run folder begun


def test_heatmap_tints_only_the_tiles():
    thumb = np.full((40, 60, 3), 200, dtype=np.uint8)
    heat = render_heatmap(thumb, (10.0, 10.0), np.array([[0, 0], [200, 100]]), 100, np.array([0.3, -0.3]))
    assert heat.shape == thumb.shape and heat.dtype == np.uint8
    assert (heat[15:, :20] == 200).all() and (heat[:10, 30:] == 200).all()  # untouched outside the tiles
    assert heat[5, 5, 0] > heat[5, 5, 2] and heat[15, 25, 2] > heat[15, 25, 0]  # red for, blue against


@requires_real_slides
def test_real_svs_slides(trained, tmp_path, capsys):
    # Coarse tiles keep the trunk's work small; the TCGA slide records no µm/px, hence the override.
    site = write_site_yaml(tmp_path, {"manifest": "manifest.csv", "mpp_override": 0.5}, model=HEAD,
                           tiling={"target_mpp": 4.0, "tile_size": 96, "min_tissue": 0.2})
    out = tmp_path / "out"
    code = main(["predict", "--model", str(trained["checkpoint"]), "--out", str(out), "--config", str(site),
                 "--no-progress", str(REAL_SLIDES)])
    assert code == 1
    summary = json.loads((out / "predictions.json").read_text())
    status = {s["name"]: s["status"] for s in summary["slides"]}
    assert status == {"broken": "failed", "cmu-1-small-region": "ok", "tcga-cr-7395-01a-01-ts1": "ok"}
    for name in ("cmu-1-small-region", "tcga-cr-7395-01a-01-ts1"):
        assert Image.open(out / f"{name}.overlay.png").size == Image.open(out / f"{name}.thumbnail.png").size
        assert all(math.isfinite(t["importance"]) for t in json.loads((out / f"{name}.json").read_text())["tiles"])
