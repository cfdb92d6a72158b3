"""The consortium CA and the SuperLink certificate: what a site's TLS check relies on."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.certificates import (
    CertificateError,
    ConsortiumFiles,
    describe,
    init_consortium,
    renew_server_certificate,
)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def san_values(cert: x509.Certificate) -> tuple[list[str], list[ipaddress._BaseAddress]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), san.get_values_for_type(x509.IPAddress)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory) -> ConsortiumFiles:
    return init_consortium(tmp_path_factory.mktemp("certs"), "superlink.example.org",
                           sans=["10.1.2.3", "fl.hospital-a.org"], days=30)


def test_standard_file_names(tmp_path):
    files = ConsortiumFiles.in_folder(tmp_path)
    assert [path.name for path in files.paths()] == ["ca.pem", "ca.key", "server.pem", "server.key"]
    assert all(path.parent == tmp_path for path in files.paths())


def test_server_certificate_is_issued_by_the_ca(consortium, tmp_path):
    ca, server = load_cert(consortium.ca_cert), load_cert(consortium.server_cert)
    server.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)  # self-signed
    other = init_consortium(tmp_path, "superlink.example.org")  # same CA name, another key
    with pytest.raises(InvalidSignature):
        server.verify_directly_issued_by(load_cert(other.ca_cert))


def test_ca_extensions_and_subject(consortium):
    ca = load_cert(consortium.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    common_name = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert common_name == "superlink.example.org fedpath consortium CA"
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(ca.public_key().curve, ec.SECP384R1)


def test_server_certificate_names_and_usage(consortium):
    server = load_cert(consortium.server_cert)
    assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "superlink.example.org"
    dns, ips = san_values(server)
    assert set(dns) == {"superlink.example.org", "fl.hospital-a.org", "localhost"}
    assert set(ips) == {ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")}
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert isinstance(server.public_key().curve, ec.SECP384R1)
    lifetime = server.not_valid_after_utc - datetime.now(timezone.utc)
    assert timedelta(days=29, hours=23) < lifetime <= timedelta(days=30)


def test_ip_name_and_duplicates_are_listed_once(tmp_path):
    files = init_consortium(tmp_path, "192.168.0.10", sans=["192.168.0.10", "LOCALHOST", "127.0.0.1"])
    dns, ips = san_values(load_cert(files.server_cert))
    assert dns == ["localhost"]
    assert ips == [ipaddress.ip_address("192.168.0.10"), ipaddress.ip_address("127.0.0.1")]


def test_key_files_are_owner_only_and_match_their_certificates(consortium):
    for key_path, cert_path in ((consortium.ca_key, consortium.ca_cert),
                                (consortium.server_key, consortium.server_cert)):
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(cert_path.stat().st_mode) == 0o644
        assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert key.public_key() == load_cert(cert_path).public_key()


def test_tls_handshake_on_loopback_with_the_ca_only(consortium):
    """What a SuperNode does with --root-certificates: trust only ca.pem and check the name 127.0.0.1."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(consortium.server_cert, consortium.server_key)
    client_context = ssl.create_default_context(cafile=str(consortium.ca_cert))
    pipes = [ssl.MemoryBIO() for _ in range(4)]
    client = client_context.wrap_bio(pipes[0], pipes[1], server_hostname="127.0.0.1")
    server = server_context.wrap_bio(pipes[2], pipes[3], server_side=True)
    done = set()
    for _ in range(10):
        for name, side, outgoing, incoming in (("client", client, pipes[1], pipes[2]),
                                               ("server", server, pipes[3], pipes[0])):
            try:
                side.do_handshake()
                done.add(name)
            except ssl.SSLWantReadError:
                pass
            incoming.write(outgoing.read())
        if done == {"client", "server"}:
            break
    assert done == {"client", "server"}
    assert client.getpeercert()["subject"] == ((("commonName", "superlink.example.org"),),)


def test_second_init_refuses_and_names_the_files_then_force_replaces(tmp_path):
    files = init_consortium(tmp_path, "superlink")
    old_ca = files.ca_cert.read_bytes()
    with pytest.raises(CertificateError) as refused:
        init_consortium(tmp_path, "superlink")
    assert str(files.ca_cert) in str(refused.value) and str(files.server_key) in str(refused.value)
    assert files.ca_cert.read_bytes() == old_ca
    init_consortium(tmp_path, "superlink", force=True)
    assert files.ca_cert.read_bytes() != old_ca
    assert stat.S_IMODE(files.ca_key.stat().st_mode) == 0o600


def test_one_leftover_file_is_enough_to_refuse(tmp_path):
    (tmp_path / "server.key").write_text("old")
    with pytest.raises(CertificateError, match="server.key"):
        init_consortium(tmp_path, "superlink")
    assert not (tmp_path / "ca.pem").exists()


def test_creates_the_folder(tmp_path):
    files = init_consortium(tmp_path / "a" / "b", "superlink")
    assert files.server_cert.is_file()


@pytest.mark.parametrize("days", [0, -5])
def test_days_below_one_are_refused(tmp_path, days):
    with pytest.raises(CertificateError, match="at least 1"):
        init_consortium(tmp_path, "superlink", days=days)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("bad", ["bad name", "under_score.org", "-x.org", "", "a" * 64 + ".org"])
def test_bad_host_names_are_refused(tmp_path, bad):
    with pytest.raises(CertificateError, match="neither an IP address nor a DNS host name"):
        init_consortium(tmp_path, "superlink", sans=[bad])


def test_name_longer_than_a_common_name_is_refused(tmp_path):
    with pytest.raises(CertificateError, match="64 characters"):
        init_consortium(tmp_path, "x" * 65)


def test_renew_keeps_the_ca_and_issues_a_new_certificate_and_key(tmp_path):
    files = init_consortium(tmp_path, "superlink", days=10)
    ca_before, key_before = files.ca_cert.read_bytes(), files.server_key.read_bytes()
    old = load_cert(files.server_cert)
    renew_server_certificate(files, "superlink", sans=["10.0.0.7"], days=20)
    new = load_cert(files.server_cert)
    assert files.ca_cert.read_bytes() == ca_before
    assert new.serial_number != old.serial_number
    assert files.server_key.read_bytes() != key_before
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600
    new.verify_directly_issued_by(load_cert(files.ca_cert))
    assert ipaddress.ip_address("10.0.0.7") in san_values(new)[1]
    assert new.not_valid_after_utc > old.not_valid_after_utc


def test_renew_refuses_a_certificate_that_outlives_the_ca(tmp_path):
    files = init_consortium(tmp_path, "superlink")
    with pytest.raises(CertificateError, match="outlive"):
        renew_server_certificate(files, "superlink", days=365 * 20)


def test_renew_refuses_a_key_that_is_not_the_cas(tmp_path):
    files = init_consortium(tmp_path / "one", "superlink")
    stranger = init_consortium(tmp_path / "two", "superlink")
    files.ca_key.write_bytes(stranger.ca_key.read_bytes())
    with pytest.raises(CertificateError, match=r"ca\.key: this key does not belong"):
        renew_server_certificate(files, "superlink")


def test_renew_without_a_ca_names_the_missing_file(tmp_path):
    with pytest.raises(CertificateError, match=r"ca\.pem: no such certificate file"):
        renew_server_certificate(ConsortiumFiles.in_folder(tmp_path), "superlink")


def test_describe(consortium):
    info = describe(consortium.server_cert)
    cert = load_cert(consortium.server_cert)
    assert info["subject"] == "CN=superlink.example.org"
    assert info["issuer"] == "CN=superlink.example.org fedpath consortium CA"
    assert {"superlink.example.org", "10.1.2.3", "127.0.0.1", "localhost"} <= set(info["sans"])
    assert datetime.fromisoformat(info["not_valid_after"]) == cert.not_valid_after_utc
    assert info["sha256"].replace(":", "").lower() == cert.fingerprint(hashes.SHA256()).hex()


def test_describe_refuses_garbage(tmp_path):
    path = tmp_path / "ca.pem"
    path.write_text("not a certificate")
    with pytest.raises(CertificateError, match="not a PEM certificate"):
        describe(path)
