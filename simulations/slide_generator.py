"""Generated hospitals: synthetic H&E slides with a manifest per site, for tests, demos and simulations.

Every slide is a real pyramidal JPEG-tiled TIFF that OpenSlide opens (``pyramidal_tiff.py``) showing
tissue of its class (``tissue_rendering.py``), so the whole data path (slide reading, tissue
detection, tiling, features, training) runs without patient data. Each site has its own stain and
class balance, and patients with one or two slides::

    OUT/site-1/manifest.csv          # slide,label,patient
    OUT/site-1/slides/slide-001.tif
    ...

A seed gives the same bytes every time: slide ``j`` of site ``k`` draws from its own generator
seeded by ``(seed, k, j)``, the site's stain, labels and patients from one seeded by ``(seed, k)``.

Slides up to ``STREAMED_ABOVE`` pixels are drawn whole in memory (``render_tissue``, the more detailed
renderer); larger ones, up to a scanner's 80000 x 60000 px, tile by tile (``large_slide.py``) straight
into the file, in memory that does not grow with the slide.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.atomic_files import atomic_write_bytes
from simulations.large_slide import ProceduralSlide
from simulations.pyramidal_tiff import level_sizes, write_pyramid_tiff, write_pyramid_tiff_tiles
from simulations.tissue_rendering import (
    LABELS,
    CancerRegion,
    SlideSpec,
    Stain,
    checked_region,
    render_tissue,
    site_stain,
)

__all__ = ["LABELS", "MANIFEST_HEADER", "STREAMED_ABOVE", "CancerRegion", "SlideInfo", "SlideSpec", "Stain",
           "make_site_slides", "make_slide", "render_tissue", "site_folder", "site_stain", "write_pyramid_tiff"]

MANIFEST_HEADER = ("slide", "label", "patient")

DEFAULT_SPEC = SlideSpec()
"""2048 x 2048 px at 0.5 µm/px (20x), 256-px JPEG tiles of quality 90."""

STREAMED_ABOVE = 8192 * 8192
"""Slides with more pixels than this at level 0 are rendered tile by tile and streamed to disk.
``render_tissue`` holds about 14 bytes per pixel (0.9 GB at 8192 x 8192, measured): 67 GB at
80000 x 60000. Below it the whole-array renderer stays, so existing data sets keep their bytes."""


@dataclass(frozen=True)
class SlideInfo:
    """What ``make_slide`` wrote."""

    path: Path
    label: str
    width: int
    height: int
    mpp: float
    cancer_region: CancerRegion | None = None
    levels: int = 1


def make_slide(path: Path, label: str, spec: SlideSpec, stain: Stain, rng: np.random.Generator,
               cancer_region: Sequence[float] | None = None, streamed: bool | None = None,
               progress: Callable[[int, int], None] | None = None) -> SlideInfo:
    """Render one slide and write it to ``path``, atomically; what was written.

    Args:
        path: the TIFF to write.
        label: one of ``LABELS``.
        spec: size, µm/px, tile size and JPEG quality.
        stain: the site's staining.
        rng: the slide's own generator: the same state gives the same bytes.
        cancer_region: see ``render_tissue``.
        streamed: render tile by tile (``large_slide.ProceduralSlide``) into the file rather than whole
            in memory (``render_tissue``); default: when the slide has more than ``STREAMED_ABOVE`` pixels.
        progress: for a streamed slide, called as ``progress(tiles_done, tiles_total)``.

    The label, µm/px and cancer region are also stored as JSON in level 0's ImageDescription
    (OpenSlide's ``tiff.ImageDescription``), with ``"renderer": "tiles"`` for a streamed slide.
    """
    region = checked_region(cancer_region) if cancer_region is not None else None
    description = {"generator": "fedpath-synthetic", "label": label, "mpp": spec.mpp,
                   "cancer_region": list(region) if region else None}
    if streamed is None:
        streamed = spec.width * spec.height > STREAMED_ABOVE
    if streamed:
        slide = ProceduralSlide(label, spec, stain, rng, region)
        levels = write_pyramid_tiff_tiles(path, spec.width, spec.height, spec.mpp, slide.render, spec.tile,
                                          spec.jpeg_quality, json.dumps({**description, "renderer": "tiles"}),
                                          progress=progress)
    else:
        rgb = render_tissue(label, spec, stain, rng, region)
        write_pyramid_tiff(path, rgb, spec.mpp, spec.tile, spec.jpeg_quality, json.dumps(description))
        levels = len(level_sizes(spec.width, spec.height))
    return SlideInfo(Path(path), label, spec.width, spec.height, spec.mpp, region, levels)


def make_site_slides(out_dir: Path, sites: int, slides_per_site: int, seed: int, spec: SlideSpec = DEFAULT_SPEC,
                     progress: bool = False, vary_size: bool = True,
                     cancer_fraction_range: tuple[float, float] = (0.3, 0.7)) -> list[Path]:
    """Generate ``sites`` hospitals of ``slides_per_site`` slides each; their manifests' paths.

    Args:
        out_dir: gets ``site-<k>/slides/slide-<nnn>.tif`` and ``site-<k>/manifest.csv``
            (``slide,label,patient``, ``slide`` relative to the manifest's folder).
        sites: number of hospitals, at least 1.
        slides_per_site: at least 1; from 2 on, every site has both classes.
        seed: the same seed gives the same files, byte for byte.
        spec: level 0 of every slide (its size jittered with ``vary_size``). With more than
            ``STREAMED_ABOVE`` pixels, every slide is streamed (``make_slide``), whatever its jitter.
        progress: a line per slide on stderr, and one per tenth of a streamed slide.
        vary_size: jitter each slide's width and height by up to ±25 % (multiples of 16 px).
        cancer_fraction_range: each site's adenocarcinoma fraction is drawn from this range.
    """
    if sites < 1 or slides_per_site < 1:
        raise ValueError(f"sites and slides_per_site must be at least 1, got {sites} and {slides_per_site}")
    low, high = cancer_fraction_range
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"cancer_fraction_range must satisfy 0 <= low <= high <= 1, got {cancer_fraction_range!r}")
    out_dir = Path(out_dir)
    manifests: list[Path] = []
    total, done, start = sites * slides_per_site, 0, time.perf_counter()
    streamed = spec.width * spec.height > STREAMED_ABOVE  # one renderer for all slides of a run
    for k in range(1, sites + 1):
        name = site_folder(k)
        site_rng = np.random.default_rng([seed, k])
        stain = site_stain(site_rng)
        labels = _site_labels(site_rng, slides_per_site, (low, high))
        patients = _patients(site_rng, labels, name)
        rows: list[tuple[str, str, str]] = []
        for j, (label, patient) in enumerate(zip(labels, patients, strict=True), start=1):
            rng = np.random.default_rng([seed, k, j])
            slide_spec = _jittered(spec, rng) if vary_size else spec
            relative = f"slides/slide-{j:03d}.tif"
            tiles = _tile_progress(f"{name}/{relative}", start) if progress and streamed else None
            make_slide(out_dir / name / relative, label, slide_spec, stain, rng, streamed=streamed, progress=tiles)
            rows.append((relative, label, patient))
            done += 1
            if progress:
                print(f"[{done}/{total}] {name}/{relative} {label} {slide_spec.width}x{slide_spec.height} "
                      f"({time.perf_counter() - start:.1f}s)", file=sys.stderr, flush=True)
        manifest = out_dir / name / "manifest.csv"
        _write_manifest(manifest, rows)
        manifests.append(manifest)
    return manifests


def site_folder(k: int) -> str:
    """Hospital ``k``'s folder name (1-based) in ``make_site_slides``'s ``out_dir``."""
    return f"site-{k}"


def _tile_progress(name: str, start: float) -> Callable[[int, int], None]:
    """A line on stderr at every tenth of a streamed slide's tiles: such a slide takes minutes."""
    def report(done: int, total: int) -> None:
        if done == total or done * 10 // total != (done - 1) * 10 // total:
            print(f"  {name}: {100 * done // total}% of {total} tiles ({time.perf_counter() - start:.0f}s)",
                  file=sys.stderr, flush=True)

    return report


def _jittered(spec: SlideSpec, rng: np.random.Generator) -> SlideSpec:
    """``spec`` with width and height scaled by 0.75-1.25 each, rounded to multiples of 16 px."""
    width_factor, height_factor = rng.uniform(0.75, 1.25, 2)
    return SlideSpec(width=max(64, int(round(spec.width * width_factor / 16)) * 16),
                     height=max(64, int(round(spec.height * height_factor / 16)) * 16),
                     mpp=spec.mpp, tile=spec.tile, jpeg_quality=spec.jpeg_quality)


def _site_labels(rng: np.random.Generator, count: int, cancer_fraction_range: tuple[float, float]) -> list[str]:
    """A site's labels in random order: the adenocarcinoma fraction drawn from ``cancer_fraction_range``,
    both classes present when ``count >= 2``."""
    fraction = rng.uniform(*cancer_fraction_range)
    carcinomas = int(round(fraction * count))
    if count >= 2:
        carcinomas = min(max(carcinomas, 1), count - 1)
    labels = [LABELS[1]] * carcinomas + [LABELS[0]] * (count - carcinomas)
    return [labels[i] for i in rng.permutation(count)]


def _patients(rng: np.random.Generator, labels: list[str], site_name: str) -> list[str]:
    """Patient ids for the slides: about a quarter of patients have two slides (of the same label)."""
    patients: list[str] = []
    waiting: dict[str, str] = {}  # label -> a patient waiting for a second slide
    count = 0
    for label in labels:
        if label in waiting:
            patients.append(waiting.pop(label))
            continue
        count += 1
        patient = f"{site_name}-p{count:03d}"
        patients.append(patient)
        if rng.random() < 0.3:
            waiting[label] = patient
    return patients


def _write_manifest(path: Path, rows: list[tuple[str, str, str]]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(MANIFEST_HEADER)
    writer.writerows(rows)
    atomic_write_bytes(path, text.getvalue().encode("utf-8"))
