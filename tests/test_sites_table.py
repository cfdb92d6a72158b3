"""`fedpath-server sites` from what the SuperLink knows: every node listed, the registry's names
beside them, unknown nodes and missing sites flagged (the real processes: test_control_plane.py)."""

from __future__ import annotations

import pytest
import yaml

from server.registration import MISSING, UNKNOWN, sites_table
from server.server_config import load_server_config
from server.site_registry import SiteRegistry
from server.superlink import FlowerError, StatePaths


class FakeControl:
    def __init__(self, nodes: list[dict] | None) -> None:
        self._nodes = nodes

    def nodes(self) -> list[dict]:
        if self._nodes is None:
            raise FlowerError("`flwr supernode ls` did not answer within 120 s")
        return self._nodes


def _config(tmp_path, sites: dict[str, int]):
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump({"classes": ["a", "b"]}))
    config = load_server_config(path)
    registry = SiteRegistry(StatePaths(config).registry)
    for name, node_id in sites.items():
        registry.add(name, node_id, f"key-{name}", f"SHA256:{name}")
    return config


def _node(node_id: int, status: str) -> dict:
    return {"node-id": str(node_id), "status": status, "created-at": "2026-01-01 10:00:00Z"}


def _line(table: str, start: str) -> str:
    (line,) = [line for line in table.splitlines() if line.startswith(start)]
    return line


def test_registered_sites_only(tmp_path):
    config = _config(tmp_path, {"hospital-a": 11, "hospital-b": 12})
    table, flagged = sites_table(config, FakeControl([_node(11, "online"), _node(12, "offline")]))
    assert flagged == 0 and UNKNOWN not in table and MISSING not in table
    assert "online" in _line(table, "hospital-a") and "SHA256:hospital-a" in _line(table, "hospital-a")
    assert "offline" in _line(table, "hospital-b")


def test_unknown_nodes_and_missing_sites_are_flagged(tmp_path):
    config = _config(tmp_path, {"hospital-a": 11, "gone": 13, "revoked-directly": 14})
    nodes = [_node(11, "online"), _node(99, "registered"), _node(98, "online"), _node(14, "unregistered"),
             _node(50, "unregistered")]  # 50: a key removed with remove-site, kept by Flower as unregistered
    table, flagged = sites_table(config, FakeControl(nodes))
    assert flagged == 4
    for node_id, status in ((99, "registered"), (98, "online")):
        line = _line(table, f"UNKNOWN              {node_id} ")
        assert status in line and line.endswith(UNKNOWN)
    assert _line(table, "gone").endswith(MISSING) and _line(table, "revoked-directly").endswith(MISSING)
    listed = table.split("\n(")[0].splitlines()
    assert not any(line.split()[1:2] == ["50"] for line in listed)  # no row for node 50 (its id column)
    assert "(1 removed key(s) not shown" in table
    assert "flwr supernode unregister NODE_ID fedpath" in table and "remove-site NAME" in table


def test_an_unreachable_superlink_is_an_error_not_an_empty_list(tmp_path):
    config = _config(tmp_path, {"hospital-a": 11})
    with pytest.raises(FlowerError, match=r"cannot list the SuperLink's nodes .*; 1 site\(s\) in .*sites.json"):
        sites_table(config, FakeControl(None))


def test_no_node_and_no_site(tmp_path):
    assert sites_table(_config(tmp_path, {}), FakeControl([])) == (
        "no sites registered; `fedpath-server add-site NAME SITE.pub --config server.yaml`", 0)


class UnregisteringControl:
    """The SuperLink's side of `remove-site`: unregisters, or fails with Flower's words."""

    def __init__(self, error: str | None = None) -> None:
        self.error, self.unregistered = error, []

    def unregister(self, node_id: int) -> None:
        if self.error is not None:
            raise FlowerError(self.error)
        self.unregistered.append(node_id)


def test_remove_site_cuts_the_key_off_at_the_superlink_before_it_leaves_the_registry(tmp_path):
    from server.registration import remove_site

    config = _config(tmp_path, {"hospital-a": 11, "hospital-b": 12})
    registry = SiteRegistry(StatePaths(config).registry)
    control = UnregisteringControl()
    assert remove_site(config, control, "hospital-a") == 11
    assert control.unregistered == [11] and set(registry.entries()) == {"hospital-b"}
    # removed at the SuperLink already (an earlier try whose registry write failed): Flower's "not found" is done
    # Flower's own words (the public message of ApiErrorCode.NODE_NOT_FOUND, as `flwr` prints it: no node id)
    control = UnregisteringControl("`flwr supernode` failed: [code: 24] Node ID not found for account.")
    assert remove_site(config, control, "hospital-b") == 12 and registry.entries() == {}


@pytest.mark.parametrize("error", [
    "`flwr supernode unregister` did not answer within 120 s",
    "`flwr supernode` failed: SuperLink connection 'fedpath' not found in the Flower configuration file",
    "`flwr supernode` failed: [code: 3] Invalid node id.",
])
def test_a_key_the_superlink_did_not_unregister_stays_in_the_registry(tmp_path, error):
    """The key still connects: its name and node id stay, and the admin is told to run the command again."""
    from server.registration import remove_site

    config = _config(tmp_path, {"hospital-a": 11})
    with pytest.raises(FlowerError, match=r"hospital-a \(node 11\) is still registered: .* run remove-site again"):
        remove_site(config, UnregisteringControl(error), "hospital-a")
    assert SiteRegistry(StatePaths(config).registry).entries()["hospital-a"]["node_id"] == 11


@pytest.mark.parametrize("text, said", [
    ("[]", "not a site registry"), ("null", "not a site registry"), ('{"sites": ["ab"]}', "not a site registry"),
    ('{"sites": {"a": {}}}', "sites.a.node_id: expected int, found nothing"),
    ('{"sites": {"a": {"node_id": "7", "public_key": "k", "fingerprint": "f", "registered": "r"}}}',
     "sites.a.node_id: expected int, found str"),
    ('{"sites": {"a": {"node_id": 7, "public_key": 3, "fingerprint": "f", "registered": "r"}}}',
     "sites.a.public_key: expected str, found int"),
    ("{not json", "unreadable site registry"),
])
def test_a_broken_registry_is_one_clear_error_and_a_run_keeps_the_names_it_read(tmp_path, text, said, caplog):
    from server.site_registry import RegistryError

    registry = SiteRegistry(tmp_path / "sites.json")
    registry.add("hospital-a", 11, "key-a", "SHA256:a")
    assert registry.name_for(11) == "hospital-a" and registry.name_for(12) == "node-12"
    registry.path.write_text(text)  # a hand edit, a disk fault, while the run reads it
    with pytest.raises(RegistryError, match=said):
        registry.entries()
    with caplog.at_level("WARNING", logger="fedpath.server"):
        assert registry.name_for(11) == "hospital-a"  # as last read whole, not a failed run
    assert said in caplog.text
    with pytest.raises(RegistryError, match=said):  # broken before anything was read: said, not guessed
        SiteRegistry(registry.path).name_for(11)
