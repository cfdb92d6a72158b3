"""A local demo consortium: generated hospitals, each with its slides, manifest and site.yaml."""

from __future__ import annotations

from pathlib import Path

import yaml

from simulations.slide_generator import LABELS, SlideSpec, make_site_slides, site_folder


def write_site_config(manifest: Path, tile_size: int, backbone_weights: str = "random",
                      privacy: dict | None = None) -> Path:
    """A site.yaml beside ``manifest``, as a hospital's IT would write it for these slides (``privacy``:
    its privacy section, if any)."""
    site_dir = manifest.parent
    config = {
        "name": site_dir.name,
        "data": {"manifest": manifest.name, "labels": list(LABELS)},
        "tiling": {"target_mpp": 0.5, "tile_size": tile_size, "min_tissue": 0.5},
        "features": {"backbone_weights": backbone_weights, "cache_dir": "cache"},
        **({"privacy": privacy} if privacy else {}),
    }
    path = site_dir / "site.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def written_sites(out: Path, sites: int) -> list[str]:
    """The hospital folders among the ``sites`` that ``make_consortium`` would write in ``out`` which already
    hold a site.yaml or manifest.csv: a person may have edited them, and generating again replaces them."""
    folders = [Path(out) / site_folder(k) for k in range(1, sites + 1)]
    return [folder.name for folder in folders
            if (folder / "site.yaml").exists() or (folder / "manifest.csv").exists()]


def make_consortium(out: Path, sites: int, slides_per_site: int, seed: int, size: int | tuple[int, int],
                    tile_size: int, progress: bool = True, backbone_weights: str = "random",
                    privacy: dict | None = None, mpp: float = 0.5, vary_size: bool = True) -> list[Path]:
    """Generate slides for ``sites`` hospitals and a site.yaml for each; returns the site.yaml paths.

    Args:
        out: the folder for the hospitals (one sub-folder each).
        sites: how many hospitals.
        slides_per_site: slides per hospital.
        seed: the only source of randomness: the same seed gives the same slides, byte for byte.
        size: a square side or (width, height) in pixels at level 0.
        tile_size: the sites' tile size (site.yaml ``tiling.tile_size``).
        progress: a progress bar while the slides are written.
        backbone_weights: the sites' trunk (site.yaml ``features.backbone_weights``).
        privacy: the sites' ``privacy`` section (None: the defaults).
        mpp: µm per pixel at level 0.
        vary_size: jitter each slide's size by ±25 %.
    """
    width, height = (size, size) if isinstance(size, int) else size
    spec = SlideSpec(width=width, height=height, mpp=mpp)
    manifests = make_site_slides(out, sites, slides_per_site, seed, spec, progress=progress, vary_size=vary_size)
    return [write_site_config(m, tile_size, backbone_weights, privacy) for m in manifests]
