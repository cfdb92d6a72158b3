"""A slide's tiles as QuPath objects: the prediction looked at over the slide itself, not a thumbnail.

Pathologists read slides in a viewer at full resolution, and QuPath is the open one most use. It
imports a GeoJSON FeatureCollection in the form it writes itself (qupath-core, ``QuPathTypeAdapters``
and ``GsonTools``): one Feature per object, whose geometry is in the pixel coordinates of the
full-resolution image (origin top left, x right, y down: exactly our level-0 coordinates, so the
tiles land on the slide they came from) and whose properties hold ``objectType``, ``classification``
``{name, color: [r, g, b]}`` and ``measurements`` ``{name: number}``.

Each tile is a ``"tile"`` object, QuPath's own kind for tiles: a detection, so measurement maps,
tables and classifiers treat it like any detection. Its class is what it argues for: the explained
class when its importance is positive; when negative, the other class of a two-class model (evidence
against one of two classes is evidence for the other) or ``not CLASS`` with more classes; no class
at exactly zero. A class has one colour in every file: QuPath keeps one colour per class name (a
file's colour only seeds a class it has not met yet), so colours that changed with the slide or its
explained class would show whichever file came first.
No ``id`` is written: QuPath gives imported objects new ones, and ids that repeat across imports of
the same slide would only collide.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

from matplotlib import colormaps

from shared.atomic_files import atomic_write_bytes

OBJECT_TYPE = "tile"
PALETTE = colormaps["tab10"].colors  # qualitative: neighbouring class indices get distinct colours
AGAINST_COLOUR = [128, 128, 128]  # `not CLASS` of a model with more than two classes


def class_colour(index: int) -> list[int]:
    """The fixed [r, g, b] of the model's class ``index`` in QuPath."""
    return [round(255 * c) for c in PALETTE[index % len(PALETTE)]]


def importance_name(explained: str) -> str:
    """The measurement holding a tile's importance; it names its class, since that varies by slide."""
    return f"importance for {explained}"


def probability_name(label: str) -> str:
    return f"P({label})"


def tile_collection(tiles: Sequence[Mapping], classes: Sequence[str], explained: int) -> dict:
    """The GeoJSON FeatureCollection of a slide's tiles, as QuPath's *Import objects* reads it.

    Args:
        tiles: the tiles as ``predict`` lists them: ``x``, ``y``, ``w``, ``h`` (level-0 pixels),
            ``importance`` and ``probability`` (of the explained class from the tile alone).
        classes: the model's classes, in the checkpoint's order.
        explained: index of the class the importances and probabilities refer to.

    Measurements: ``importance for CLASS`` and ``P(CLASS)`` of the explained class, as in the CSV,
    and for a two-class model ``P(OTHER)``, one minus it (the head's softmax over two classes sums to
    one). A value that is not finite is left out: QuPath reads a missing measurement as NaN.
    """
    name = classes[explained]
    if len(classes) == 2:
        other = classes[1 - explained]
        against = {"name": other, "color": class_colour(1 - explained)}
    else:
        other, against = None, {"name": f"not {name}", "color": AGAINST_COLOUR}
    argues_for = {"name": name, "color": class_colour(explained)}
    key_importance, key_probability = importance_name(name), probability_name(name)
    key_other = None if other is None else probability_name(other)
    features = []
    for tile in tiles:
        x, y, w, h, importance, probability = (tile[k] for k in ("x", "y", "w", "h", "importance", "probability"))
        measurements = {key_importance: importance, key_probability: probability}
        if key_other is not None:
            measurements[key_other] = 1.0 - probability
        properties = {"objectType": OBJECT_TYPE,
                      "measurements": {k: v for k, v in measurements.items() if math.isfinite(v)}}
        if importance > 0:
            properties["classification"] = argues_for
        elif importance < 0:
            properties["classification"] = against
        # zero (or NaN) argues for nothing: unclassified
        features.append({"type": "Feature",
                         # a closed ring, counter-clockwise in GeoJSON's arithmetic (RFC 7946's right-hand rule)
                         "geometry": {"type": "Polygon",
                                      "coordinates": [[[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]]},
                         "properties": properties})
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: Path, collection: dict) -> None:
    """Compact, strict JSON: slides have tens of thousands of tiles, and indentation would triple the file."""
    atomic_write_bytes(path, json.dumps(collection, separators=(",", ":"), allow_nan=False).encode())
