"""The app bundle's content digest: the same files give the same digest however they are zipped;
any change to a file, a name or the set of files changes it; the installed version's digest is
the one `flwr run` would submit."""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml

from client.site_config import load_site_config
from shared.app_bundle import (
    FLOWER_MANIFEST,
    BundleError,
    bundle_digest,
    installed_app_dir,
    installed_bundle,
    installed_bundle_report,
    installed_digest,
    normalise_digest,
)
from shared.yaml_config import ConfigError


def _members(fab: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _zip(members: list[tuple[str, bytes]], compression=zipfile.ZIP_DEFLATED, date=(2024, 10, 1, 0, 0, 0),
         directories: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        if directories:
            for folder in sorted({name.rsplit("/", 1)[0] + "/" for name, _ in members if "/" in name}):
                archive.writestr(zipfile.ZipInfo(folder, date), b"")
        for name, content in members:
            info = zipfile.ZipInfo(name, date)
            info.compress_type = compression
            info.external_attr = 0o100600 << 16
            archive.writestr(info, content)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def fab() -> bytes:
    return installed_bundle()


def test_flowers_bundle_bytes_repeat_on_one_machine_and_the_digest_is_the_installed_one(fab):
    assert installed_bundle() == fab  # fixed date, sorted paths: deterministic here ...
    assert bundle_digest(fab) == installed_digest()
    members = _members(fab)
    assert {"pyproject.toml", "client/app.py", "server/app.py", "shared/app_bundle.py", FLOWER_MANIFEST} <= set(members)
    assert not any(name.startswith("tests/") for name in members)  # fab-include: pyproject + three packages


def test_digest_ignores_zip_metadata_order_compression_and_directory_entries(fab):
    members = [(n, c) for n, c in _members(fab).items() if n != FLOWER_MANIFEST]
    expected = bundle_digest(fab)
    variants = [
        _zip(members, date=(2031, 5, 17, 13, 45, 10)),  # other timestamps
        _zip(members, compression=zipfile.ZIP_STORED),  # no compression
        _zip(list(reversed(members))),  # other member order
        _zip(members, directories=True),  # folder entries
        _zip([*members, (FLOWER_MANIFEST, b"client/app.py,0000,8")]),  # a forged manifest is not trusted, nor used
    ]
    assert all(bundle_digest(variant) == expected for variant in variants)
    assert len({hash(v) for v in variants}) == len(variants)  # and the bytes really differ


def test_any_content_name_or_file_set_change_changes_the_digest(fab):
    members = dict((n, c) for n, c in _members(fab).items() if n != FLOWER_MANIFEST)
    expected = bundle_digest(fab)
    edited = {**members, "client/app.py": members["client/app.py"] + b"\n# changed\n"}
    renamed = {("client/app2.py" if n == "client/app.py" else n): c for n, c in members.items()}
    extra = {**members, "client/extra.py": b"print('hi')\n"}
    fewer = {n: c for n, c in members.items() if n != "client/egress_policy.py"}
    digests = {bundle_digest(_zip(list(m.items()))) for m in (edited, renamed, extra, fewer)}
    assert expected not in digests and len(digests) == 4


def test_unreadable_bundles_are_errors():
    with pytest.raises(BundleError, match="not a zip"):
        bundle_digest(b"definitely not a zip")
    with pytest.raises(BundleError, match="not a zip"):
        bundle_digest(b"")
    with pytest.warns(UserWarning, match="Duplicate name"):
        twice = _zip([("client/app.py", b"a"), ("client/app.py", b"b")])
    with pytest.raises(BundleError, match="holds 'client/app.py' twice"):
        bundle_digest(twice)


def test_a_copy_with_one_changed_client_file_has_another_digest(tmp_path):
    """What the attacker test submits: the repository's app files, one client file changed."""
    copy = tmp_path / "fedpath"
    root = installed_app_dir()
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "demo", "benchmarks",
                                                              "tests", "docs"))
    assert installed_digest(copy) == installed_digest()
    with open(copy / "client" / "app.py", "a") as handle:
        handle.write("\n# an admin's change\n")
    assert installed_digest(copy) != installed_digest()


def test_digest_spelling_and_site_config(tmp_path):
    digest = "a" * 64
    assert normalise_digest(f"sha256:{digest.upper()}") == digest
    with pytest.raises(BundleError, match="not a bundle digest"):
        normalise_digest("abc")
    (tmp_path / "manifest.csv").write_text("slide,label\n")
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"name": "h", "data": {"manifest": "manifest.csv"},
                                    "federation": {"allowed_bundles": [f"sha256:{digest}", "b" * 64]}}))
    assert load_site_config(site).federation.allowed_bundles == (f"sha256:{digest}", "b" * 64)
    site.write_text(yaml.safe_dump({"name": "h", "data": {"manifest": "manifest.csv"},
                                    "federation": {"allowed_bundles": ["b" * 64, "v0.2"]}}))
    with pytest.raises(ConfigError, match=r"allowed_bundles.*item 2: a bundle digest is 64 hexadecimal"):
        load_site_config(site)


def test_report_for_the_admin_and_the_site():
    report = installed_bundle_report()
    assert f"bundle digest: sha256:{installed_digest()}" in report and str(Path(installed_app_dir())) in report
