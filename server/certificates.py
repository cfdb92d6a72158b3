"""The consortium's certificate authority and the SuperLink's TLS certificate.

Hospitals reach the SuperLink over TLS. The consortium admin runs one small CA of its own and
sends only ``ca.pem`` to each site (SuperNode ``--root-certificates``), so no public CA and no
internet access are needed, and a site trusts exactly this SuperLink. The SuperLink gets
``--ssl-ca-certfile ca.pem --ssl-certfile server.pem --ssl-keyfile server.key``.

The server certificate always names ``127.0.0.1`` and ``localhost`` as well as the public host
name: the SuperLink's own helper processes connect to it over loopback and check the name too.
Keys are EC P-384, the curve Flower uses for SuperNode authentication as well.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.atomic_files import atomic_write_bytes
from shared.errors import UserError

# Long enough that hospitals are not re-sent a CA every year; the server certificate is the
# part that is renewed (``renew_server_certificate``) and may never outlive the CA.
CA_MIN_DAYS = 3650
# 100 years: far beyond any sensible renewal, and well inside the dates X.509 and Python can hold
# (a validity of millions of days ends past the year 9999, an OverflowError mid-way).
MAX_DAYS = 36500
# Certificates start a few minutes in the past so a site whose clock runs slightly behind
# does not reject a certificate made a moment ago.
CLOCK_SKEW = timedelta(minutes=5)
LOOPBACK_NAMES = ("localhost", "127.0.0.1")
MAX_COMMON_NAME = 64  # the X.509 upper bound for a common name
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class CertificateError(UserError):
    """A certificate file, key file or setting that the admin has to fix."""


@dataclass(frozen=True)
class ConsortiumFiles:
    """Where the CA and the SuperLink's certificate and keys live."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> ConsortiumFiles:
        """The standard names, so the CLI and the docs agree on what to copy where."""
        folder = Path(folder)
        return cls(folder / "ca.pem", folder / "ca.key", folder / "server.pem", folder / "server.key")

    def paths(self) -> tuple[Path, Path, Path, Path]:
        return self.ca_cert, self.ca_key, self.server_cert, self.server_key


def init_consortium(out_dir: Path, name: str, sans: Sequence[str] = (), days: int = 365,
                    force: bool = False) -> ConsortiumFiles:
    """Make a new CA and a server certificate for host ``name`` signed by it, in ``out_dir``.

    Existing files are refused unless ``force``: overwriting ``ca.pem`` silently would cut off
    every hospital that already holds the old one.
    """
    files = ConsortiumFiles.in_folder(out_dir)
    alt_names = _subject_alt_names(name, sans)
    _check_days(days)
    if files.ca_cert.parent.exists() and not files.ca_cert.parent.is_dir():
        raise CertificateError(f"{files.ca_cert.parent}: exists and is not a folder")
    existing = [str(path) for path in files.paths() if path.exists()]
    if existing and not force:
        raise CertificateError(f"{', '.join(existing)}: already exist; a new CA would cut off every site "
                               "that holds the old ca.pem. Pass --force to replace them, or renew only the "
                               "server certificate (renew-cert)")
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _ca_subject(name)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=max(days, CA_MIN_DAYS)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=True, crl_sign=True, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private_key(files.ca_key, ca_key)
    _write_public(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _issue_server_certificate(files, ca_cert, ca_key, name, alt_names, days, now)
    return files


def renew_server_certificate(files: ConsortiumFiles, name: str, sans: Sequence[str] = (),
                             days: int = 365) -> None:
    """Re-issue ``server.pem`` and a fresh ``server.key`` from the existing CA.

    Sites keep their ``ca.pem``; only the SuperLink needs the new files (and a restart).
    """
    alt_names = _subject_alt_names(name, sans)
    _check_days(days)
    ca_cert = _load_certificate(files.ca_cert)
    ca_key = _load_ca_key(files.ca_key, ca_cert)
    now = datetime.now(timezone.utc)
    ca_expiry = ca_cert.not_valid_after_utc
    if now + timedelta(days=days) > ca_expiry:
        raise CertificateError(f"{files.ca_cert}: the CA expires on {ca_expiry.date().isoformat()}; a server "
                               f"certificate valid for {days} days would outlive it. Use fewer days, or make "
                               "a new consortium and send the new ca.pem to every site")
    _issue_server_certificate(files, ca_cert, ca_key, name, alt_names, days, now)


def describe(cert_path: Path) -> dict[str, Any]:
    """What a certificate says, for the CLI to print and the admin to compare with a site's copy."""
    cert = _load_certificate(cert_path)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [str(entry.value) for entry in san]
    except x509.ExtensionNotFound:
        sans = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": sans,
        "not_valid_after": cert.not_valid_after_utc.isoformat(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(":").upper(),
    }


def _issue_server_certificate(files: ConsortiumFiles, ca_cert: x509.Certificate,
                              ca_key: ec.EllipticCurvePrivateKey, name: str,
                              alt_names: list[x509.GeneralName], days: int, now: datetime) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=False, crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    # Key before certificate: if the run stops in between, the old certificate no longer matches
    # and the SuperLink refuses to start, instead of serving a stale pair; renewing again fixes it.
    _write_private_key(files.server_key, key)
    _write_public(files.server_cert, cert.public_bytes(serialization.Encoding.PEM))


def _ca_subject(name: str) -> x509.Name:
    """CN "<name> fedpath consortium CA"; a common name holds at most 64 characters, so a long
    host name moves to the organization field instead."""
    common_name = f"{name} fedpath consortium CA"
    if len(common_name) <= MAX_COMMON_NAME:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                      x509.NameAttribute(NameOID.COMMON_NAME, "fedpath consortium CA")])


def _subject_alt_names(name: str, sans: Sequence[str]) -> list[x509.GeneralName]:
    """``name``, the extra SANs and the loopback names, each once, IPs as IP entries."""
    if len(name) > MAX_COMMON_NAME:
        raise CertificateError(f"the server name {name!r} is longer than the {MAX_COMMON_NAME} characters a "
                               "certificate's common name holds; give a shorter name and the long host "
                               "name as an extra SAN")
    named = [(name, "the server name"), *((san, "subject alternative name") for san in sans),
             *((loopback, "loopback name") for loopback in LOOPBACK_NAMES)]
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for value, what in named:
        entry = _general_name(value, what)
        key = str(entry.value).lower()
        if key not in seen:
            seen.add(key)
            entries.append(entry)
    return entries


def _general_name(value: str, what: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if not value or len(value) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise CertificateError(f"{what} {value!r} is neither an IP address nor a DNS host name "
                               "(letters, digits and '-' between dots, e.g. superlink.hospital-a.org)")
    return x509.DNSName(value.rstrip(".").lower())


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise CertificateError(f"certificate validity --days {days!r}: must be a whole number of days, at least 1 "
                               f"and at most {MAX_DAYS} (100 years)")


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise CertificateError(f"{path}: no such certificate file") from None
    except ValueError as error:
        raise CertificateError(f"{path}: not a PEM certificate ({error})") from None


def _load_ca_key(path: Path, ca_cert: x509.Certificate) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise CertificateError(f"{path}: no such CA key file") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise CertificateError(f"{path}: not an unencrypted PEM private key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != ca_cert.public_key():
        raise CertificateError(f"{path}: this key does not belong to the CA certificate "
                               f"{ca_cert.subject.rfc4514_string()}")
    return key


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """PKCS8 PEM, owner-only. ``atomic_write_bytes`` creates its temporary file with
    ``os.open(..., 0o600)`` (``tempfile.mkstemp``), so the key is never readable by others."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    atomic_write_bytes(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, 0o644)

