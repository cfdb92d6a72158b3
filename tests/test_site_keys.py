"""A site's SuperNode key pair: the formats Flower 1.42 loads, and the mistakes an admin can make."""

from __future__ import annotations

import shutil
import stat
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from server.site_registry import RegistryError, SiteRegistry
from shared.site_keys import SiteKeyError, fingerprint, keygen, read_public_key


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return keygen(tmp_path_factory.mktemp("keys"), "hospital-a_1")


def test_keygen_writes_named_files_with_owner_only_private_key(pair):
    private_path, public_path = pair
    assert (private_path.name, public_path.name) == ("hospital-a_1.key", "hospital-a_1.pub")
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(public_path.stat().st_mode) == 0o644


def test_private_key_loads_the_way_flower_supernode_loads_it(pair):
    """flwr/supernode/cli/flower_supernode.py: load_ssh_private_key(path.read_bytes(), None), EC required."""
    private_path, public_path = pair
    assert private_path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    key = serialization.load_ssh_private_key(private_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    public = serialization.load_ssh_public_key(public_path.read_bytes())
    assert key.public_key() == public


def test_public_key_is_accepted_and_normalized(pair):
    _, public_path = pair
    line = read_public_key(public_path)
    assert line.startswith("ecdsa-sha2-nistp384 AAAA") and len(line.split()) == 2
    assert public_path.read_text().split()[:2] == line.split()
    assert public_path.read_text().split()[2] == "hospital-a_1"  # comment naming the site
    assert isinstance(serialization.load_ssh_public_key(line.encode()), ec.EllipticCurvePublicKey)


def test_keygen_refuses_to_overwrite_without_force(tmp_path):
    private_path, public_path = keygen(tmp_path, "site")
    old = public_path.read_bytes()
    with pytest.raises(SiteKeyError) as refused:
        keygen(tmp_path, "site")
    assert str(private_path) in str(refused.value) and str(public_path) in str(refused.value)
    assert public_path.read_bytes() == old
    keygen(tmp_path, "site", force=True)
    assert public_path.read_bytes() != old
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600


def test_keygen_refuses_when_only_the_public_key_is_left(tmp_path):
    (tmp_path / "site.pub").write_text("old")
    with pytest.raises(SiteKeyError, match=r"site\.pub"):
        keygen(tmp_path, "site")
    assert not (tmp_path / "site.key").exists()


@pytest.mark.parametrize("name", ["", "a" * 65, "../evil", "has space", "dot.ted", "é", "trailing\n"])
def test_bad_site_names_are_refused(tmp_path, name):
    with pytest.raises(SiteKeyError, match="1 to 64 letters, digits"):
        keygen(tmp_path, name)
    assert not any(tmp_path.iterdir())
    # the admin cannot register a name no site can have either
    registry = SiteRegistry(tmp_path / "sites.json")
    with pytest.raises(RegistryError, match=r"site name .*: use 1 to 64 letters, digits, '-' or '_', as the"):
        registry.check_new(name, "ecdsa-sha2-nistp384 AAAA")


def test_longest_site_name_is_accepted(tmp_path):
    private_path, _ = keygen(tmp_path, "a" * 64)
    assert private_path.is_file()


def test_read_public_key_refuses_the_private_key(pair):
    private_path, _ = pair
    with pytest.raises(SiteKeyError, match="PRIVATE key; it must stay at the site"):
        read_public_key(private_path)


def test_read_public_key_refuses_a_pkcs8_private_key(tmp_path):
    path = tmp_path / "site.pub"
    path.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(SiteKeyError, match="PRIVATE key"):
        read_public_key(path)


def openssh_line(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


@pytest.mark.parametrize("make, kind", [
    (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), "ssh-rsa"),
    (ed25519.Ed25519PrivateKey.generate, "ssh-ed25519"),
    (lambda: ec.generate_private_key(ec.SECP256R1()), "ecdsa-sha2-nistp256"),
])
def test_read_public_key_refuses_other_key_types(tmp_path, make, kind):
    path = tmp_path / "other.pub"
    path.write_text(openssh_line(make()) + " someone@host\n")
    with pytest.raises(SiteKeyError, match=f"a {kind} key; .*ecdsa-sha2-nistp384"):
        read_public_key(path)


@pytest.mark.parametrize("content", [
    b"hello world\n",
    b"ecdsa-sha2-nistp384 AAAAnotbase64!!\n",
    b"",
    b"\x89PNG\r\n\x1a\n\x00\x00",
])
def test_read_public_key_refuses_garbage(tmp_path, content):
    path = tmp_path / "site.pub"
    path.write_bytes(content)
    with pytest.raises(SiteKeyError, match=r"site\.pub: "):
        read_public_key(path)


def test_read_public_key_refuses_two_keys_in_one_file(tmp_path, pair):
    path = tmp_path / "two.pub"
    line = pair[1].read_text()
    path.write_text(line + line)
    with pytest.raises(SiteKeyError, match="2 non-empty lines"):
        read_public_key(path)


def test_read_public_key_refuses_a_missing_file_and_a_huge_file(tmp_path):
    with pytest.raises(SiteKeyError, match="no such public key file"):
        read_public_key(tmp_path / "missing.pub")
    with pytest.raises(SiteKeyError, match="is a folder; expected the hospital's one-line <site>.pub file"):
        read_public_key(tmp_path)
    big = tmp_path / "big.pub"
    big.write_bytes(b"x" * 100_000)
    with pytest.raises(SiteKeyError, match="far too large"):
        read_public_key(big)


def test_fingerprint_ignores_the_comment_and_differs_between_keys(pair, tmp_path):
    line = read_public_key(pair[1])
    value = fingerprint(line)
    assert value.startswith("SHA256:") and not value.endswith("=") and len(value) == 7 + 43
    assert fingerprint(pair[1].read_text()) == value
    _, other = keygen(tmp_path, "other")
    assert fingerprint(other.read_text()) != value
    with pytest.raises(SiteKeyError, match="not an OpenSSH public key"):
        fingerprint("garbage")


def test_fingerprint_matches_ssh_keygen(pair):
    if shutil.which("ssh-keygen") is None:  # never skipped: the reference is OpenSSH's own fingerprint
        pytest.fail("ssh-keygen missing: `make install` installs Debian's openssh-client as root "
                    "(apt-get install openssh-client)", pytrace=False)
    printed = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pair[1])],
                             capture_output=True, text=True, check=True, timeout=600).stdout
    assert printed.split()[1] == fingerprint(read_public_key(pair[1]))
