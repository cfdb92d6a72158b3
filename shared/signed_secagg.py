"""Signatures that make Flower's SecAgg+ hold against a server that does not follow the protocol.

Flower's SecAgg+ trusts the server to relay the protocol honestly: a site takes whatever list of
public keys the server hands it as "the other sites", and whatever sets of active and dropped
sites it names at unmasking. A server that cheats can then read one site's update alone, with
no colluding site at all: it invents the other sites (keys it made itself) and receives every
secret share of the victim's masks (Bonawitz et al., CCS 2017, section 6: the malicious setting
needs authenticated keys and a consistency check). fedpath adds three signed statements, each
made with the hospital's own P-384 key (the one its SuperNode authenticates with) and checked
by every other site against the consortium's **roster**, the member hospitals' public keys each
hospital holds itself (site.yaml ``federation.roster``), never the server's word:

1. **keys** (setup reply): "in run R, round G, node N's SecAgg+ keys are pk1, pk2, and it offers
   (or does not offer) its evaluation counts". A site accepts a share-keys list only if every
   entry is signed by a different roster member, so the server cannot add sites of its own.
2. **view** (share-keys reply): "in run R, round G, the round's sites and keys are exactly this
   list, these of them offer their evaluation counts, and its SecAgg+ settings are these" (the
   setup's sample size, shares, threshold, clipping, quantisation and modulus ranges, maximum
   weight: ``settings_statement``). A site sends its masked vector only once every partner signed
   the same list, offers and settings, so the server cannot pair it with a few sites, show the
   others another round, or quantise the others' updates to nothing (a maximum weight of 1e12 for
   every site but one scales theirs to zero).
3. **survivors** (an extra exchange before unmasking): "in run R, round G, the sites whose
   masked vectors are summed are exactly S, and this site trained on the instructions with digest
   D" (the plan and model of the collect stage, ``instructions_digest``). A site signs one S per
   round and reveals shares only for an S every site of which signed it with the site's own D, so
   every site answers for the same S, and every site of S trained on the same plan and model.

**Evaluation counts** ride in the masked vector beside the update. A site that does not release its
own (``privacy.release_evaluation: false``, no validation slides) sends zeros there, so with mixed
settings the "sum" of the counts could be one site's own. Each site therefore says at setup, signed
with its keys, whether it offers its counts, and releases them only when every site of the round
offered (the view): the counts are summed over the same sites as the update, or nobody's leave.

A site that sits a SecAgg+ round out (its budget, a refused plan...) answers the collect stage with
its refusal code instead of a masked vector, so it is not in S: every site of S trained. With full
pairing and a majority threshold, the counting argument of SecAgg then leaves the server nothing
smaller than the sum over S, and S holds at least ``min_round_sites`` sites that trained on the same
plan and model: a server cannot make the others send nothing, by their refusals or by instructions
of their own, and read one site's update as the sum (docs/security.md, section 2).

This module holds what both sides need: the record and stage names, the exact bytes signed, and
the roster. The site's checks are in ``client/secure_round.py``; the server relays the signatures
(``server/secure_aggregation.py``) and can forge none of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from shared.errors import UserError
from shared.site_keys import SiteKeyError, fingerprint, normalize_public_key, public_key_line

RECORD = "fedpath-secagg"
"""Config record of fedpath's signed statements, beside Flower's ``secaggplus_configs``, both ways."""

STAGE_KEY = "stage"
SURVIVORS_STAGE = "survivors"
"""fedpath's own exchange between SecAgg+'s collect and unmask stages (the server asks, each site signs)."""
SURVIVORS_KEY = "survivors"
EVALUATION_OFFER = "evaluation_offer"
"""In a site's setup reply: whether it offers its evaluation counts this round (signed with its keys)."""
OFFERS = "evaluation_offers"
"""In the share-keys message: the nodes whose setup reply offered their evaluation counts (the server relays)."""

# What a site's reply adds in ``RECORD`` (reviewed in client/egress_policy.py like everything that leaves).
KEY_SIGNATURE, SIGNER, VIEW_SIGNATURE, SURVIVORS_SIGNATURE = "key_signature", "signer", "view_signature", \
    "survivors_signature"

_DOMAIN = b"fedpath-secagg/1"
_SIGNATURE = ec.ECDSA(hashes.SHA384())


def _statement(kind: str, run_id: int, group: str, *parts: bytes) -> bytes:
    """Length-prefixed, so no two different statements have the same bytes."""
    out = [_DOMAIN, kind.encode(), str(run_id).encode(), group.encode(), *parts]
    return b"".join(len(part).to_bytes(4, "big") + part for part in out)


def key_statement(run_id: int, group: str, node_id: int, pk1: bytes, pk2: bytes, offers_evaluation: bool) -> bytes:
    return _statement("keys", run_id, group, str(node_id).encode(), pk1, pk2, b"1" if offers_evaluation else b"0")


def view_statement(run_id: int, group: str, keys: dict[int, tuple[bytes, bytes]], settings: bytes,
                   offers: Collection[int]) -> bytes:
    """The round's sites and their keys, in node order, those that offer their evaluation counts, and its
    SecAgg+ settings (``settings_statement``): the same bytes at every site that got the same of all three."""
    digest = hashlib.sha256()
    for node_id in sorted(keys):
        pk1, pk2 = keys[node_id]
        digest.update(_statement("entry", run_id, group, str(node_id).encode(), pk1, pk2))
    return _statement("view", run_id, group, digest.digest(), hashlib.sha256(settings).digest(),
                      ",".join(str(n) for n in sorted(set(offers))).encode())


def settings_statement(setup: Mapping[str, object], stage_key: str) -> bytes:
    """Every value of a SecAgg+ setup message but its stage, by key: what Flower's mod masks and quantises
    with, taken from each site's own setup message and compared with no other site's."""
    return b"".join(_statement("setting", 0, "", key.encode(), type(setup[key]).__name__.encode(),
                               repr(setup[key]).encode()) for key in sorted(setup) if key != stage_key)


def survivors_statement(run_id: int, group: str, view: bytes, survivors: list[int], instructions: bytes) -> bytes:
    """Bound to the round's view (``view_statement``): a site that the server makes start the round
    again (new keys, so another view) cannot lend its new signature to the first one. Bound to the
    instructions the site trained on (``instructions_digest``): sites shown another plan or model
    sign another statement."""
    return _statement("survivors", run_id, group, hashlib.sha256(view).digest(),
                      ",".join(str(n) for n in sorted(set(survivors))).encode(), instructions)


PER_SITE_RECORDS = (RECORD_KEY_CONFIGS, RECORD)
"""The collect-stage records that differ from site to site by design (Flower's shares and source list,
fedpath's signatures); every other record (the plan, the model) is the same for every site of a round."""


def instructions_digest(content: RecordDict, per_site: Collection[str] = PER_SITE_RECORDS) -> bytes:
    """SHA-256 of a collect-stage message's records except the ``per_site`` ones: the plan and the model
    every site of a round must receive alike. Records are taken by name and config entries by
    key; the arrays of a record in their order, which is the order training reads them in (Flower
    turns an array record into a list of arrays), so the same arrays in another order are another
    model."""
    digest = hashlib.sha256()
    for name in sorted(set(content.keys()) - set(per_site)):
        record = content[name]
        digest.update(_statement("record", 0, "", name.encode(), type(record).__name__.encode()))
        for key in (list(record.keys()) if isinstance(record, ArrayRecord) else sorted(record.keys())):
            value = record[key]
            if isinstance(value, Array):
                array = value.numpy()
                parts = (key.encode(), array.dtype.str.encode(), repr(array.shape).encode(), array.tobytes())
            else:  # config and metric values: numbers, strings, bytes, booleans and lists of them
                parts = (key.encode(), type(value).__name__.encode(), repr(value).encode())
            digest.update(_statement("entry", 0, "", *parts))
    return digest.digest()


def sign(private_key: ec.EllipticCurvePrivateKey, statement: bytes) -> bytes:
    return private_key.sign(statement, _SIGNATURE)


def verifies(public_key: ec.EllipticCurvePublicKey, signature: bytes, statement: bytes) -> bool:
    try:
        public_key.verify(signature, statement, _SIGNATURE)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def signer_key(line: bytes) -> ec.EllipticCurvePublicKey | None:
    """The public key of a signer's OpenSSH line as sent; None if it is not one."""
    try:
        key = serialization.load_ssh_public_key(bytes(line))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return key if isinstance(key, ec.EllipticCurvePublicKey) else None


class RosterError(UserError):
    """The roster file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Roster:
    """The consortium's member hospitals: public key line (OpenSSH, normalised) -> name."""

    path: Path
    members: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> "Roster":
        """Read ``path``: one ``ecdsa-sha2-nistp384 AAAA... [name]`` line per hospital (a site's ``.pub``
        files concatenated); blank lines and ``#`` comments are skipped."""
        path = Path(path)
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise RosterError(f"{path}: cannot read the consortium roster ({exc})") from None
        members: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if "PRIVATE KEY" in line:
                raise RosterError(f"{path}:{number}: a private key; the roster holds public keys only")
            try:
                key = normalize_public_key(" ".join(line.split()[:2]), f"{path}:{number}")
            except SiteKeyError as exc:
                raise RosterError(str(exc)) from None
            name = " ".join(line.split()[2:]) or fingerprint(key)
            if key in members:
                raise RosterError(f"{path}:{number}: the key of {members[key]!r} again ({name!r}); "
                                  "each hospital is listed once")
            members[key] = name
        if len(members) < 2:
            raise RosterError(f"{path}: {len(members)} member key(s); a consortium roster lists every member "
                              "hospital's public key, one per line")
        return cls(path, members)

    def public_key(self, line: bytes) -> ec.EllipticCurvePublicKey | None:
        """The member key of a signer as sent (its OpenSSH line), or None if it is not on the roster."""
        try:
            text = line.decode("ascii")
        except (UnicodeDecodeError, AttributeError):
            return None
        if text not in self.members:
            return None
        return serialization.load_ssh_public_key(text.encode())

    def fingerprints(self) -> list[str]:
        """``name  SHA256:...`` per member, for the data-protection officer to compare out of band."""
        return [f"{name}  {fingerprint(key)}" for key, name in self.members.items()]


def load_signing_key(path: Path) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """The site's private key (OpenSSH, as `fedpath-site keygen` writes it) and its public line."""
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise RosterError(f"{path}: cannot read this site's private key to sign SecAgg+ statements ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise RosterError(f"{path}: not an EC P-384 key")
    return key, public_key_line(key.public_key()).encode()
