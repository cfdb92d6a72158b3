"""DICOM whole-slide images: the handout's real SVS slide converted at test time into a DICOM WSI series
(``wsidicomizer``, a dev dependency; it copies the SVS's JPEG tiles), read by OpenSlide 4 from the
series' folder. ``check``, ``prepare`` and ``predict`` must give the same tiles, vectors and prediction
as from the SVS."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from client.cli import main as site_main
from client.feature_cache import FeatureCache
from client.prepare import prepare_site
from client.site_config import load_site_config
from client.slides import SlideError, open_slide
from shared.checkpoints import save_checkpoint
from shared.model import ModelConfig, build_head
from shared.parameters import model_arrays
from tests.conftest import FEDERATION_CLASSES, REAL_SLIDES, requires_real_slides, write_site_yaml

pytestmark = requires_real_slides
SVS = REAL_SLIDES / "cmu-1-small-region.svs"


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """The folder of a DICOM WSI series made from the SVS."""
    try:
        from wsidicomizer import WsiDicomizer
    except ImportError as exc:  # a dev dependency: missing means a broken install, never a skip
        pytest.fail(f"wsidicomizer is missing ({exc}): pip install -e '.[dev]'", pytrace=False)
    folder = tmp_path_factory.mktemp("dicom") / "cmu-1-dicom"
    try:
        WsiDicomizer.convert(str(SVS), output_path=str(folder))
    except FileNotFoundError as exc:  # opentile needs libjpeg-turbo's library (Debian: libturbojpeg0)
        pytest.fail(f"{exc}: `make install` installs libturbojpeg0 as root", pytrace=False)
    assert len(list(folder.glob("*.dcm"))) >= 2  # the pyramid and its label, overview and thumbnail
    return folder


def test_the_series_folder_reads_as_the_svs(series):
    svs, dicom = open_slide(SVS), open_slide(series)
    assert dicom.properties["openslide.vendor"] == "dicom"
    assert dicom.dimensions == svs.dimensions and dicom.level_count == svs.level_count
    assert dicom.properties["openslide.mpp-x"] == svs.properties["openslide.mpp-x"]
    for x, y in ((0, 0), (700, 1200), (1900, 2600)):
        assert np.array_equal(np.asarray(dicom.read_region((x, y), 0, (256, 256))),
                              np.asarray(svs.read_region((x, y), 0, (256, 256))))


def test_a_folder_without_a_series_is_explained(tmp_path):
    (tmp_path / "notes.txt").write_text("an export that went wrong")
    (tmp_path / "image.dcm").write_bytes(b"DICM" * 64)
    with pytest.raises(SlideError, match=r"none of its 2 files is a DICOM whole-slide image"):
        open_slide(tmp_path)


def test_check_prepare_and_predict_treat_the_series_as_the_svs(series, tmp_path, capsys):
    empty = tmp_path / "empty-export"
    empty.mkdir()
    (empty / "readme.txt").write_text("the PACS export failed")
    (tmp_path / "manifest.csv").write_text(f"slide,label,patient\n{SVS},adenoma,p1\n{series},adenoma,p2\n"
                                           f"{empty},adenoma,p3\n")
    site = write_site_yaml(tmp_path, {"manifest": "manifest.csv", "labels": FEDERATION_CLASSES})
    assert site_main(["check", "--config", str(site)]) != 0
    report = capsys.readouterr().out
    assert f"{empty}: a folder, and none of its 1 file is a DICOM" in report and f"{series}:" not in report

    (tmp_path / "manifest.csv").write_text(f"slide,label,patient\n{SVS},adenoma,p1\n{series},adenoma,p2\n")
    config = load_site_config(site)
    prepare_site(config, progress=False)
    cache = FeatureCache(config.features.cache_dir)
    entries = {item: cache.load(record["key"]) for item, record in cache.read_index().items.items()}
    from_svs, from_dicom = entries[str(SVS)], entries[str(series)]
    assert np.array_equal(from_svs.coords, from_dicom.coords) and len(from_svs.coords) > 20
    assert np.abs(from_svs.features - from_dicom.features).max() <= 1e-4

    torch.manual_seed(0)
    model = ModelConfig(projection=16, hidden=8)
    save_checkpoint(tmp_path / "run", 1, model_arrays(build_head(model, 2)),
                    {"model": model.as_dict(), "classes": FEDERATION_CLASSES, "sequence_length": 8}, best=False)
    (tmp_path / "predict-site").mkdir()
    fresh = write_site_yaml(tmp_path / "predict-site", {"manifest": str(tmp_path / "manifest.csv"),
                                                        "labels": FEDERATION_CLASSES})  # an empty cache
    assert site_main(["predict", str(SVS), str(series), "--model", str(tmp_path / "run/checkpoints/latest.npz"),
                      "--out", str(tmp_path / "out"), "--config", str(fresh), "--no-progress"]) == 0
    svs_result = json.loads((tmp_path / "out" / "cmu-1-small-region.json").read_text())
    dicom_result = json.loads((tmp_path / "out" / "cmu-1-dicom.json").read_text())
    assert dicom_result["predicted_class"] == svs_result["predicted_class"]
    for name in FEDERATION_CLASSES:
        assert dicom_result["probabilities"][name] == pytest.approx(svs_result["probabilities"][name], abs=1e-4)
