"""A virtual hospital packed to travel with its tasks (``simulation.backend.data: travel``): the copy a
Ray node checks out is complete and names nothing outside itself, and its state comes back.

The run on a real Ray cluster is in tests/test_ray_cluster.py; these need no Ray.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import yaml

from client.feature_cache import FeatureCache
from client.site_config import load_site_config
from shared.yaml_config import ConfigError
from simulations.sim_config import parse_sim_config
from simulations.site_travel import Returned, pack_folder, pack_inputs, unpack, write_back
from tests.conftest import FEDERATION_CLASSES, copy_hospitals


def test_the_copy_holds_everything_its_site_yaml_names_and_nothing_outside(prepared_hospitals, tmp_path):
    site_yaml, = copy_hospitals(prepared_hospitals, tmp_path, 1)
    trunk = tmp_path / "elsewhere" / "trunk.pth"  # a trunk file outside the hospital's folder
    trunk.parent.mkdir()
    trunk.write_bytes(b"weights")
    document = yaml.safe_load(site_yaml.read_text())
    document["features"]["backbone_weights"] = str(trunk)
    site_yaml.write_text(yaml.safe_dump(document))
    (tmp_path / "hospitals" / "unrelated.npz").write_bytes(b"x")  # a store holds other hospitals' vectors

    copy = tmp_path / "node" / "site-001"
    unpack(pack_inputs(site_yaml), copy)
    config = load_site_config(copy / "site.yaml")
    for path in (config.features.cache_dir, config.state_dir, Path(config.features.backbone_weights),
                 config.data.manifest):
        assert copy.resolve() in Path(path).resolve().parents, path
    assert Path(config.features.backbone_weights).read_bytes() == b"weights"
    original = FeatureCache(load_site_config(site_yaml).features.cache_dir)
    travelled = FeatureCache(config.features.cache_dir)
    index = travelled.read_index()
    assert index == original.read_index() and index.items
    for record in index.items.values():  # every vector the index names, byte for byte, and no other file
        assert travelled.path_for(record["key"]).read_bytes() == original.path_for(record["key"]).read_bytes()
    assert len(list((copy / "cache" / "features").iterdir())) == len({r["key"] for r in index.items.values()})


def test_state_comes_back_into_the_hospitals_folder(prepared_hospitals, tmp_path):
    site_yaml, = copy_hospitals(prepared_hospitals, tmp_path, 1)
    state = load_site_config(site_yaml).state_dir
    (state / "ledgers").mkdir(parents=True)
    (state / "ledgers" / "old-run.json").write_text("{}")  # a ledger of an earlier run stays
    node = tmp_path / "node-state"
    unpack(pack_folder(state), node)
    (node / "ledgers" / "this-run.json").write_text(json.dumps({"rounds": [1]}))

    assert write_back({"site-001": Returned(pack_folder(node), 42)}, {"site-001": site_yaml}, "node-id") == ["site-001"]
    assert json.loads((state / "ledgers" / "this-run.json").read_text()) == {"rounds": [1]}
    assert (state / "ledgers" / "old-run.json").read_text() == "{}"
    assert (site_yaml.parent / "node-id").read_text() == "42\n"
    assert not [p for p in site_yaml.parent.iterdir() if "-state-" in p.name]  # no staging left


def test_an_archive_that_would_write_outside_its_folder_is_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("../escaped.json")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(tarfile.OutsideDestinationError):
        unpack(buffer.getvalue(), tmp_path / "copy")
    assert not (tmp_path / "escaped.json").exists()


def test_travel_is_for_a_cluster():
    config = parse_sim_config({"classes": FEDERATION_CLASSES,
                               "simulation": {"backend": {"address": "auto", "data": "travel"}}})
    assert config.simulation.backend.data == "travel"
    with pytest.raises(ConfigError, match="data.*travel is for a Ray cluster"):
        parse_sim_config({"classes": FEDERATION_CLASSES, "simulation": {"backend": {"data": "travel"}}})
    with pytest.raises(ConfigError, match="data"):
        parse_sim_config({"classes": FEDERATION_CLASSES, "simulation": {"backend": {"data": "nfs"}}})


def test_a_deployed_site_ignores_a_travel_key_the_server_puts_in_the_run_config(tmp_path):
    """`simulation-travel` is a declared run-config key, so a server can send it to real hospitals: their
    ClientApp must neither fetch a hospital from a store nor read one from anywhere but its own site.yaml."""
    from flwr.app import Context, RecordDict

    from client.app import SIMULATION_SITES_KEY, SIMULATION_TRAVEL_KEY, SITE_CONFIG_KEY, site_yaml_of, travelling_site

    own = tmp_path / "site.yaml"
    context = Context(run_id=1, node_id=7, node_config={SITE_CONFIG_KEY: str(own)}, state=RecordDict(),
                      run_config={SIMULATION_SITES_KEY: str(tmp_path / "elsewhere"), SIMULATION_TRAVEL_KEY: "ns"})
    passed = []
    assert travelling_site("message", context, lambda msg, ctx: passed.append(msg) or "reply") == "reply"
    assert passed == ["message"] and site_yaml_of(context) == own
