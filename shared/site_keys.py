"""A hospital's own key pair, with which its SuperNode proves who it is to the SuperLink.

With ``--enable-supernode-auth`` the SuperLink accepts only nodes whose public key the
consortium admin registered (``flwr supernode register KEY.pub ...``). Each site makes its pair
here, keeps ``<name>.key`` on the SuperNode machine (``--auth-supernode-private-key``) and sends
only ``<name>.pub`` to the admin. Flower wants EC P-384 keys in OpenSSH formats: the SuperNode
reads the private key with ``load_ssh_private_key`` (flwr/supernode/cli/flower_supernode.py), so
it is written as an unencrypted ``OPENSSH PRIVATE KEY``, not as PKCS8 PEM.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.atomic_files import atomic_write_bytes
from shared.errors import UserError

KEY_TYPE = "ecdsa-sha2-nistp384"
# A public key line is well under 1 KiB; anything far larger was picked by mistake (a slide, an archive).
MAX_PUBLIC_KEY_BYTES = 16 * 1024
_SITE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def site_name_problem(name: object) -> str | None:
    """What is wrong with a site name (it names the site's key files and its registry entry), or None."""
    return None if isinstance(name, str) and _SITE_NAME.fullmatch(name) else "use 1 to 64 letters, digits, '-' or '_'"


class SiteKeyError(UserError):
    """A site key file or site name that the person has to fix."""


def keygen(out_dir: Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Write ``<name>.key`` (owner-only) and ``<name>.pub`` in ``out_dir``; return both paths.

    Existing files are refused unless ``force``: a new pair would lock the site out until the
    admin registers the new public key.
    """
    if site_name_problem(name):
        raise SiteKeyError(f"site name {name!r}: {site_name_problem(name)} (it names the key files)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SiteKeyError(f"{out_dir}: exists and is not a folder")
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    existing = [str(path) for path in (private_path, public_path) if path.exists()]
    if existing and not force:
        raise SiteKeyError(f"{', '.join(existing)}: already exist; a new key pair must be registered "
                           "again by the consortium admin before this site can join. Pass --force to replace them")
    key = ec.generate_private_key(ec.SECP384R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
    public_line = public_key_line(key.public_key())
    # ``atomic_write`` creates its temporary file with os.open(..., 0o600) (tempfile.mkstemp):
    # the private key is never readable by others, not even for a moment.
    atomic_write_bytes(private_path, private_pem, 0o600)
    # The trailing comment tells the admin which site sent the file; Flower ignores it.
    atomic_write_bytes(public_path, f"{public_line} {name}\n".encode(), 0o644)
    return private_path, public_path


def read_public_key(path: Path) -> str:
    """The normalized ``ecdsa-sha2-nistp384 AAAA...`` line in ``path``, checked before registering."""
    path = Path(path)
    if path.is_dir():
        raise SiteKeyError(f"{path}: is a folder; expected the hospital's one-line <site>.pub file")
    if not path.is_file():
        raise SiteKeyError(f"{path}: no such public key file")
    size = path.stat().st_size
    if size > MAX_PUBLIC_KEY_BYTES:
        raise SiteKeyError(f"{path}: {size} bytes is far too large for a public key; "
                           "expected the one-line <site>.pub file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SiteKeyError(f"{path}: cannot be read ({error.strerror or error})") from None
    if b"PRIVATE KEY" in data:
        raise SiteKeyError(f"{path}: this is a PRIVATE key; it must stay at the site. "
                           "Send or register the matching .pub file instead")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise SiteKeyError(f"{path}: not a text file; expected one line '{KEY_TYPE} AAAA...'") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise SiteKeyError(f"{path}: holds {len(lines)} non-empty lines; expected exactly one "
                           f"'{KEY_TYPE} AAAA...' line")
    return normalize_public_key(lines[0], str(path))


def fingerprint(public_key_line: str) -> str:
    """``SHA256:<base64>`` as ``ssh-keygen -lf`` prints it, for the admin and the site to compare."""
    blob = base64.b64decode(normalize_public_key(public_key_line.strip(), "public key").split()[1])
    digest = hashes.Hash(hashes.SHA256())
    digest.update(blob)
    return "SHA256:" + base64.b64encode(digest.finalize()).decode().rstrip("=")


def normalize_public_key(line: str, source: str) -> str:
    """The key re-encoded without comment, once it parsed as an EC P-384 OpenSSH public key."""
    try:
        key = serialization.load_ssh_public_key(line.encode())
    except (ValueError, UnsupportedAlgorithm):
        raise SiteKeyError(f"{source}: not an OpenSSH public key; expected '{KEY_TYPE} AAAA...'") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise SiteKeyError(f"{source}: a {line.split()[0]} key; Flower SuperNode authentication here "
                           f"uses {KEY_TYPE} keys (make one with the site key generator)")
    return public_key_line(key)


def public_key_line(key: ec.EllipticCurvePublicKey) -> str:
    """``ecdsa-sha2-nistp384 AAAA...`` without comment: how keys are written, registered and compared."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()

