"""Shared fixtures: small generated slides for every test run, the handout's real slides when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

# The suite must not fight itself for cores: two threads like CI, shared among pytest-xdist's
# processes when `make test` runs several.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_collection_modifyitems(items):
    """The longest tests first (tests of equal cost keep their order). `make test` hands whole files to
    pytest-xdist's processes in the order of their first test (``--no-loadscope-reorder``); a five-minute
    consortium file handed out last would run alone at the end. Slow tests state what they took in CI:
    ``slow(seconds=...)``; one slow test hands its whole file out early."""
    def cost(item) -> float:
        marker = item.get_closest_marker("slow")
        return marker.kwargs.get("seconds", 60) if marker else 0

    items.sort(key=lambda item: -cost(item))  # stable: equal costs keep their order


HANDOUT = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_SLIDES = HANDOUT / "slides"
CRC_TILES = HANDOUT / "crc-tiles"

requires_real_slides = pytest.mark.skipif(
    not REAL_SLIDES.is_dir(), reason=f"real slides are handout data, absent here ({REAL_SLIDES})")
requires_crc_tiles = pytest.mark.skipif(
    not CRC_TILES.is_dir(), reason=f"real colorectal tiles are handout data, absent here ({CRC_TILES})")

# Small tiles at 1 µm/px keep InceptionV3 cheap: a 1024-px slide is a 5 x 5 grid of 96-px tiles.
FAST_TILING = {"target_mpp": 1.0, "tile_size": 96, "min_tissue": 0.4, "mask_size": 256}


@pytest.fixture(scope="session")
def generated_manifests(tmp_path_factory) -> list[Path]:
    from simulations.slide_generator import SlideSpec, make_site_slides

    out = tmp_path_factory.mktemp("generated")
    return make_site_slides(out, sites=2, slides_per_site=4, seed=7, spec=SlideSpec(width=1024, height=1024))


def write_site_yaml(folder: Path, data: dict, **sections) -> Path:
    """A site.yaml in ``folder`` with fast tiling unless ``tiling`` is given."""
    config = {"name": folder.name, "data": data, "tiling": dict(FAST_TILING),
              "features": {"batch_size": 16, "num_workers": 0, "cache_dir": str(folder / "cache")}}
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


FEDERATION_CLASSES = ["adenoma", "adenocarcinoma"]


@pytest.fixture(scope="session")
def prepared_hospitals(tmp_path_factory, worker_id) -> Path:
    """Three generated hospitals with prepared feature caches, made once per test session (shared by
    pytest-xdist's workers: three concurrent preparations took three times as long); tests read them
    or copy them, never write into them."""
    import shutil

    from filelock import FileLock

    from client.prepare import prepare_site
    from client.site_config import load_site_config
    from simulations.slide_generator import SlideSpec, make_site_slides

    base = tmp_path_factory.getbasetemp()
    root = (base if worker_id == "master" else base.parent) / "prepared-hospitals"
    with FileLock(f"{root}.lock"):
        if not (root / "done").exists():
            shutil.rmtree(root, ignore_errors=True)  # a session that died half-way
            manifests = make_site_slides(root, sites=3, slides_per_site=5, seed=11,
                                         spec=SlideSpec(width=1024, height=1024))
            for manifest in manifests:
                site = write_site_yaml(manifest.parent, {"manifest": "manifest.csv", "labels": FEDERATION_CLASSES})
                prepare_site(load_site_config(site), progress=False)
            (root / "done").touch()
    return root


def copy_hospitals(prepared: Path, tmp_path: Path, count: int) -> list[Path]:
    """The site.yaml files of a private copy of ``count`` prepared hospitals."""
    import shutil

    copy = tmp_path / "hospitals"
    shutil.copytree(prepared, copy)
    sites = sorted(copy.glob("site-*/site.yaml"))[:count]
    for site in sites:  # the cache path was written absolute: point it at the copy
        document = yaml.safe_load(site.read_text())
        document["features"]["cache_dir"] = str(site.parent / "cache")
        site.write_text(yaml.safe_dump(document))
    return sites


def disclosed_site(epsilon: float = 1.0, refused: int = 0, **numbers):
    """What the server knows of a site in a round: it answered, and its disclosed numbers."""
    from server.round_metrics import SiteRound

    return SiteRound(answered=True, refused=refused,
                     disclosed={"epsilon": epsilon, "delta": 1e-5, "refused": float(refused), **numbers})


def record_round(recorder, round_: int, arrays, sites=None, evaluation=None) -> dict:
    """A model saved by an exchange and scored by the next one, as the ServerApp records them."""
    recorder.save_model(round_, list(arrays), sites or {})
    return recorder.close_model(round_, evaluation if evaluation is not None else {"accuracy": 0.5, "auc": 0.5})


@pytest.fixture(scope="session")
def nginx():
    """The installed nginx (the SuperLink's proxy). Absent, the test fails, never skips: the
    control plane's protection is nginx, and `make install` installs it when run as root."""
    from server.fleet_proxy import ProxyError, find_nginx

    try:
        return find_nginx()
    except ProxyError as exc:
        pytest.fail(f"this test needs nginx: {exc}", pytrace=False)
