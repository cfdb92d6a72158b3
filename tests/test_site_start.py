"""`fedpath-site start` before any process: what it runs, what it refuses, what it imports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from client.site_config import load_site_config
from client.supernode import SiteStartError, supernode_command
from shared.errors import UserError
from shared.site_keys import keygen


def _site(tmp_path: Path, **federation) -> Path:
    (tmp_path / "manifest.csv").write_text("slide,label\n")
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"name": "hospital-a", "data": {"manifest": "manifest.csv"},
                                    "federation": {"server": "fl.example:9092", **federation}}))
    return path


def test_tls_and_authentication_by_default(tmp_path):
    (tmp_path / "ca.pem").write_text("(a CA)")
    site = _site(tmp_path, ca_cert="ca.pem")
    config = load_site_config(site)
    keygen(Path(config.federation.auth_key).parent, "hospital-a")
    command = supernode_command(config, site, insecure=False)
    assert command[command.index("--root-certificates") + 1] == str(tmp_path / "ca.pem")
    assert command[command.index("--auth-supernode-private-key") + 1] == str(tmp_path / "state/keys/hospital-a.key")
    assert "--insecure" not in command
    assert f"site-config='{site.resolve()}'" in command


def test_refuses_to_start_without_the_consortium_ca_or_its_key(tmp_path):
    site = _site(tmp_path)
    with pytest.raises(SiteStartError, match="ca_cert is not set"):
        supernode_command(load_site_config(site), site, insecure=False)
    (tmp_path / "ca.pem").write_text("(a CA)")
    site = _site(tmp_path, ca_cert="ca.pem")
    with pytest.raises(SiteStartError, match="private key .*hospital-a.key is missing.*fedpath-site keygen"):
        supernode_command(load_site_config(site), site, insecure=False)


def test_insecure_turns_tls_and_authentication_off_and_says_so(tmp_path, capsys):
    site = _site(tmp_path)
    command = supernode_command(load_site_config(site), site, insecure=True)
    assert "--insecure" in command and "--auth-supernode-private-key" not in command
    assert "TLS is OFF" in capsys.readouterr().out


def test_refuses_without_a_server_address(tmp_path):
    (tmp_path / "manifest.csv").write_text("slide,label\n")
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"name": "hospital-a", "data": {"manifest": "manifest.csv"}}))
    with pytest.raises(SiteStartError, match="federation.server is not set"):
        supernode_command(load_site_config(site), site, insecure=True)


def test_protocol_stages_do_not_import_torch_or_opacus():
    """Flower starts a process per message; SecAgg+'s key and unmask stages only load client.app."""
    code = "import sys, client.app; print(sorted(m for m in ('torch', 'opacus', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600).stdout
    assert out.strip() == "[]"


def test_keygen_writes_the_key_start_looks_for_and_a_key_name_it_cannot_write_is_refused(tmp_path, capsys):
    """`auth_key: state/keys/hosp.pem` made keygen write hosp.key and start ask for hosp.pem, for ever."""
    from client.cli import main

    (tmp_path / "ca.pem").write_text("(a CA)")
    site = _site(tmp_path, ca_cert="ca.pem", auth_key="keys/hosp.pem")
    assert main(["keygen", "--config", str(site)]) == 2
    assert f"{site}:" in (err := capsys.readouterr().err) and "federation.auth_key: must name a <site>.key file" in err
    assert not (tmp_path / "keys").exists()
    site = _site(tmp_path, ca_cert="ca.pem", auth_key="keys/hosp.key")
    assert main(["keygen", "--config", str(site)]) == 0
    assert (tmp_path / "keys" / "hosp.key").is_file() and (tmp_path / "keys" / "hosp.pub").is_file()
    command = supernode_command(load_site_config(site), site, insecure=False)
    assert command[command.index("--auth-supernode-private-key") + 1] == str(tmp_path / "keys" / "hosp.key")
    assert main(["keygen", "--config", str(site)]) == 2  # never over a key the admin registered
    assert "Pass --force to replace them" in capsys.readouterr().err


def test_a_site_name_that_cannot_name_its_files_is_refused_at_its_line(tmp_path):
    site = _site(tmp_path)
    site.write_text(site.read_text().replace("name: hospital-a", "name: hospital a"))
    with pytest.raises(UserError, match=rf"{site}:\d+: name: use 1 to 64 letters, digits, '-' or '_'"):
        load_site_config(site)
