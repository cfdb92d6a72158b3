"""`fedpath-site predict`'s QuPath overlay and heatmap figure: NAME.geojson is valid GeoJSON whose
polygons are exactly the tile grid in level-0 pixels and whose measurements are the CSV's; the
heatmap's opacity is an option, and a bad one is refused before any slide is read.

One generated slide, an untrained head (the files' form does not depend on what it learned) and the
fast tiling keep the end-to-end run to seconds; that importances find tumour is tests/test_predict.py's.
"""

import csv
import json
import math

import geojson
import numpy as np
import pytest
import shapely
import torch
from PIL import Image
from shapely.geometry import box, shape

from client.cli import main
from client.heatmap import MAX_ALPHA, heatmap_figure, render_heatmap
from client.qupath import OBJECT_TYPE, class_colour, tile_collection
from shared.checkpoints import save_checkpoint
from shared.model import ModelConfig, build_head
from shared.parameters import model_arrays
from simulations.slide_generator import SlideSpec, Stain, make_slide
from tests.conftest import FEDERATION_CLASSES, write_site_yaml

HEAD = {"projection": 16, "hidden": 8}
LENGTH = 8
ROUND = 3
ALPHA = 0.4  # not the default: the files must show the option was passed through
THUMBNAIL = 256  # smaller than the slide, so level-0 coordinates and thumbnail pixels differ


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """One slide predicted through the CLI with --heatmap-alpha; its files, parsed."""
    root = tmp_path_factory.mktemp("qupath")
    make_slide(root / "slides" / "case.tif", "adenocarcinoma", SlideSpec(1024, 1024), Stain(),
               np.random.default_rng(3), cancer_region=(0.0, 0.0, 0.5, 1.0))
    site = write_site_yaml(root, {"manifest": "manifest.csv"}, model=HEAD)
    torch.manual_seed(0)
    config = ModelConfig(**HEAD)
    save_checkpoint(root / "run", ROUND, model_arrays(build_head(config, len(FEDERATION_CLASSES))),
                    {"model": config.as_dict(), "classes": FEDERATION_CLASSES, "sequence_length": LENGTH}, best=False)
    out = root / "out"
    assert main(["predict", "--model", str(root / "run" / "checkpoints" / "latest.npz"), "--out", str(out),
                 "--config", str(site), "--heatmap-alpha", str(ALPHA), "--thumbnail-size", str(THUMBNAIL),
                 "--no-progress",
                 str(root / "slides" / "case.tif")]) == 0
    doc = json.loads((out / "case.json").read_text())
    with open(out / "case.tiles.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    text = (out / doc["geojson"]).read_text()
    return {"root": root, "out": out, "doc": doc, "rows": rows, "text": text,
            "model": root / "run" / "checkpoints" / "latest.npz"}


def test_the_geojson_is_valid_and_in_qupaths_form(predicted):
    collection = geojson.loads(predicted["text"])
    assert collection.is_valid, collection.errors()
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == len(predicted["rows"]) == len(predicted["doc"]["tiles"]) > 4
    for feature in features:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        assert feature["properties"]["objectType"] == OBJECT_TYPE == "tile"
        assert "id" not in feature  # QuPath gives imported objects their own
    assert predicted["doc"]["geojson"] == "case.geojson"


def test_polygons_are_the_tile_grid_in_level0_pixels(predicted):
    features = geojson.loads(predicted["text"])["features"]
    polygons = []
    for feature, row in zip(features, predicted["rows"], strict=True):
        x, y, w, h = (int(row[k]) for k in ("x", "y", "w", "h"))
        polygon = shape(feature["geometry"])
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(feature["geometry"]["coordinates"]) == 1  # closed, no holes
        assert polygon.is_valid and polygon.equals(box(x, y, x + w, y + h))
        assert x % w == 0 and y % h == 0  # on the grid of the tile's side
        polygons.append(polygon)
    # Tiles touch at most along edges: together they cover exactly the sum of their areas.
    assert shapely.union_all(polygons).area == pytest.approx(sum(p.area for p in polygons))
    tree = shapely.STRtree(polygons)
    for i, polygon in enumerate(polygons):
        assert all(polygon.intersection(polygons[j]).area == 0 for j in tree.query(polygon) if j != i)
    # Level-0 pixels: the grid spans the slide, not the thumbnail.
    assert max(p.bounds[2] for p in polygons) > predicted["doc"]["thumbnail"]["width"]


def test_measurements_equal_the_csv(predicted):
    doc = predicted["doc"]
    explained = doc["explained_class"]
    other, = set(doc["classes"]) - {explained}
    features = geojson.loads(predicted["text"])["features"]
    for feature, row, tile in zip(features, predicted["rows"], doc["tiles"], strict=True):
        measurements = feature["properties"]["measurements"]
        assert set(measurements) == {f"importance for {explained}", f"P({explained})", f"P({other})"}
        assert measurements[f"importance for {explained}"] == float(row["importance"]) == tile["importance"]
        assert measurements[f"P({explained})"] == float(row["probability"]) == tile["probability"]
        assert measurements[f"P({other})"] == pytest.approx(1 - tile["probability"])


def test_each_tile_is_classed_by_what_it_argues_for(predicted):
    doc = predicted["doc"]
    classes, explained = doc["classes"], doc["explained_class"]
    other, = set(classes) - {explained}
    features = geojson.loads(predicted["text"])["features"]
    seen = set()
    for feature, tile in zip(features, doc["tiles"], strict=True):
        classification = feature["properties"].get("classification")
        if tile["importance"] == 0:
            assert classification is None
            continue
        name = explained if tile["importance"] > 0 else other
        assert classification == {"name": name, "color": class_colour(classes.index(name))}
        seen.add(name)
    assert seen and seen <= set(classes)
    colours = [class_colour(i) for i in range(len(classes))]
    assert colours[0] != colours[1] and all(0 <= c <= 255 and isinstance(c, int) for c in sum(colours, []))


def test_more_than_two_classes_and_unusable_values():
    tiles = [{"x": 0, "y": 0, "w": 10, "h": 10, "importance": 0.2, "probability": 0.5},
             {"x": 10, "y": 0, "w": 10, "h": 10, "importance": -0.1, "probability": 0.1},
             {"x": 20, "y": 0, "w": 10, "h": 10, "importance": 0.0, "probability": math.nan}]
    features = tile_collection(tiles, ["a", "b", "c"], 1)["features"]
    assert features[0]["properties"]["classification"]["name"] == "b"
    assert features[1]["properties"]["classification"]["name"] == "not b"  # evidence against b favours no one class
    assert "classification" not in features[2]["properties"]
    assert features[2]["properties"]["measurements"] == {"importance for b": 0.0}  # NaN left out: QuPath reads NaN
    assert set(features[0]["properties"]["measurements"]) == {"importance for b", "P(b)"}
    assert geojson.loads(json.dumps({"type": "FeatureCollection", "features": features})).is_valid


def test_the_overlay_is_drawn_with_the_chosen_alpha(predicted):
    doc, out = predicted["doc"], predicted["out"]
    thumb = np.asarray(Image.open(out / doc["thumbnail"]["file"]))
    overlay = np.asarray(Image.open(out / doc["overlay"]["file"]))
    assert doc["overlay"]["alpha"] == ALPHA
    tiles = doc["tiles"]
    args = (thumb, tuple(doc["thumbnail"]["level0_px_per_px"]), np.array([[t["x"], t["y"]] for t in tiles]),
            tiles[0]["w"], np.array([t["importance"] for t in tiles]))
    assert np.array_equal(overlay, render_heatmap(*args, alpha=ALPHA))
    assert MAX_ALPHA != ALPHA and not np.array_equal(overlay, render_heatmap(*args))  # the default differs
    assert np.array_equal(render_heatmap(*args, alpha=0.0), thumb)  # transparent tiles: the thumbnail itself
    assert np.abs(render_heatmap(*args, alpha=1.0).astype(int) - thumb).sum() > np.abs(overlay.astype(int)
                                                                                        - thumb).sum()


def test_the_heatmap_has_a_title_and_a_colour_bar(predicted):
    doc = predicted["doc"]
    predicted_class = doc["predicted_class"]
    title = doc["heatmap"]["title"]
    assert title == f"case: {predicted_class}, p = {doc['probabilities'][predicted_class]:.3f} (model round {ROUND})"
    assert doc["heatmap"]["colour_bar"].startswith(f"importance for {doc['explained_class']}")

    values = np.array([0.02, -0.05, 0.01])
    figure = heatmap_figure(np.full((60, 80, 3), 200, np.uint8), values, "a title", "a label")
    image, bar = figure.axes
    assert figure.get_suptitle() == "a title" and bar.get_ylabel() == "a label" and image.images
    assert bar.get_ylim() == pytest.approx((-0.05, 0.05))  # the range the overlay's colours were scaled to


@pytest.mark.parametrize("alpha", ["1.5", "-0.1", "nan"])
def test_a_bad_alpha_is_refused_before_any_slide_is_read(predicted, tmp_path, capsys, alpha):
    out = tmp_path / "out"
    code = main(["predict", "--model", str(predicted["model"]), "--out", str(out), "--heatmap-alpha", alpha,
                 "--no-progress", str(predicted["root"] / "slides")])
    assert code == 2
    error = capsys.readouterr().err
    assert f"--heatmap-alpha {float(alpha)}" in error and "between 0" in error and "1 (opaque" in error
    assert not out.exists()

