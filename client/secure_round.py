"""The site's own conditions on a SecAgg+ round, checked before Flower's mod acts on a stage.

Flower's ``secaggplus_mod`` takes the round's sites, pairings and unmask sets from the server as
given; it only needs a threshold's worth of each. A server that cheats could then read one site's
update: pair it with a few sites and declare those dropped to the others, invent sites of its own,
or name different survivors to different sites. The checks here close those (the argument is in
docs/security.md, section 2):

- every stage: a strict-majority threshold, at least ``min_round_sites`` sites, one round at a time
  (run and group of the setup);
- **full pairing**: this site is masked with every site of its share-keys list, never a subset;
- **only sites that trained are summed**: a site that sits the round out (``client/federated_round.py``:
  its budget, a plan it refuses) answers the collect stage with its refusal code, never with a masked
  zero vector, so it is not among the survivors, and a round needs ``min_round_sites`` survivors;
- **evaluation counts only from every site or from none**: each site says at setup whether it offers
  its evaluation counts (``privacy.release_evaluation`` and validation slides), and releases them
  only when every site of the round's view offered (``may_release_evaluation``); otherwise a site that
  sends zero counts would leave the others' "sum" of counts to fewer sites, or one;
- with a consortium **roster** (site.yaml ``federation.roster``): every site's keys are signed by a
  different member hospital, every partner signed the same list of sites and keys, and shares are
  revealed only for the one set of survivors this site signed and every survivor signed too, each
  having trained on the same plan and model as this site (``shared/signed_secagg.py``). Without a
  roster only the first three hold, on the server's word about who the survivors are, and so does who
  offered its evaluation counts (each site checks only its own offer: a server can show each site a
  list of offers of its own and read one site's counts, as it can read one site's update then); the
  site's log says so at every round.

Failures raise :class:`UnsafeRound`; the ClientApp answers it with refusal 9 and no text.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from shared.file_memo import file_version
from shared.refusals import strict_majority
from shared.server_labels import server_label
from shared.signed_secagg import (
    EVALUATION_OFFER,
    KEY_SIGNATURE,
    OFFERS,
    RECORD,
    SIGNER,
    STAGE_KEY,
    SURVIVORS_KEY,
    SURVIVORS_SIGNATURE,
    SURVIVORS_STAGE,
    VIEW_SIGNATURE,
    Roster,
    instructions_digest,
    key_statement,
    load_signing_key,
    settings_statement,
    sign,
    survivors_statement,
    verifies,
    view_statement,
)

log = logging.getLogger("fedpath.site")

STATE = "fedpath-secaggplus"
"""The site's own record in the run's context: what the current SecAgg+ round announced and signed.
It changes only when a stage succeeds (Flower's mod answered it): a message the site or Flower
refuses leaves it as it was, so a server cannot switch the view a site signs survivors for."""
GROUPS = "fedpath-secaggplus-groups"
"""The rounds (Flower group ids) this site has set up in the run: each once. Flower's workflow never
repeats one; a server that restarts a round would get fresh keys and another view signed."""


ROUND_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
NODE_ID = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True)
class MaskedSum:
    """What the training of a SecAgg+ collect stage is told about the sum its reply joins."""

    every_site_offered: bool  # every site of the round's signed view offered its evaluation counts


_MASKED_SUM: ContextVar[MaskedSum | None] = ContextVar("fedpath_masked_sum", default=None)


class UnsafeRound(Exception):
    """A SecAgg+ stage the site refuses (refusal 9); the message is for the site's log only."""


def training_for_a_masked_sum() -> bool:
    """True while Flower's mod runs this site's training for a SecAgg+ collect stage. A site that sits
    such a round out must answer with its refusal code, not with a masked vector of zeros: that vector
    would count the site among those summed, and a server that makes every other site sit out (or a
    round in which they do) would read one site's update as the "sum"."""
    return _MASKED_SUM.get() is not None


def may_release_evaluation() -> bool:
    """Whether this site's training may put its evaluation counts into its reply: always in a plain round
    (the server sees each reply anyway); in a SecAgg+ collect stage only when every site of the round
    offered its counts at setup, so that the counts are summed over the same sites as the update."""
    masked = _MASKED_SUM.get()
    return masked is None or masked.every_site_offered


@dataclass(frozen=True)
class SiteSigner:
    """The consortium roster and this site's key: what makes the checks hold against a cheating server."""

    roster: Roster
    key: object  # ec.EllipticCurvePrivateKey
    public: bytes  # this site's OpenSSH public key line, as it appears on the roster

    @classmethod
    def for_site(cls, roster: Path | None, auth_key: Path | None) -> "SiteSigner | None":
        """None without a roster; otherwise the roster and key, which must list this site's own key.
        Read again when the roster file changes (the task runner lives for weeks)."""
        if roster is None:
            return None
        key = None if auth_key is None else Path(auth_key)
        # Both files: a roster or a key replaced within one timestamp tick, or edited in place, is read again.
        versions = tuple(_version_of(path) for path in (Path(roster), key))
        return _signer(Path(roster), key, versions)


def _version_of(path: Path | None) -> tuple[int, ...] | None:
    try:
        return None if path is None else file_version(path.stat())
    except OSError:
        return None  # Roster.load and load_signing_key say what is wrong with the path


@lru_cache(maxsize=8)
def _signer(roster_path: Path, auth_key: Path | None, versions: tuple) -> SiteSigner:
    roster = Roster.load(roster_path)
    if auth_key is None:
        raise UnsafeRound(f"{roster_path}: a roster needs this site's key (federation.auth_key) to sign with")
    key, public = load_signing_key(auth_key)
    if public.decode() not in roster.members:
        raise UnsafeRound(f"{roster_path}: this site's own key ({auth_key}.pub) is not on the consortium roster")
    return SiteSigner(roster, key, public)


def is_survivors_request(msg: Message) -> bool:
    """fedpath's own exchange before unmasking (it never reaches Flower's mod or the training code)."""
    record = msg.content.config_records.get(RECORD) if msg.has_content() else None
    return record is not None and record.get(STAGE_KEY) == SURVIVORS_STAGE


def note_collect(folder: Path, run: int, group: str) -> None:
    """Write down, durably, that this site trains for round ``group`` of run ``run``; UnsafeRound if it did
    before, also when that try ended in a refusal (Flower's mod does not move on after one, and each try
    trains and may spend privacy). On disk, not in the run's context: the task runner hands the context back
    to the SuperNode only after the reply, and should that fail, a resent collect stage would find the
    context of before, with the same masks, and a second masked vector under them would give away the
    difference of the two updates."""
    folder.mkdir(parents=True, exist_ok=True)
    line = f"{group}\n"
    with open(folder / f"run-{int(run)}.collects", "a+", encoding="ascii") as handle:
        handle.seek(0)
        if line in handle.readlines():
            raise UnsafeRound(f"a second collect stage in round {group}: this site trained for it before")
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def secure_stage(msg: Message, context: Context, call_next, min_round_sites: int,
                 signer: SiteSigner | None, collects: Path, offers_evaluation: Callable[[], bool]) -> Message:
    """One SecAgg+ stage (or fedpath's survivors exchange) at the site: check it, let Flower's mod
    answer it (the collect stage trains through ``call_next``), sign the reply. Raises UnsafeRound.

    Args:
        msg: the server's stage message.
        context: the run's context at this site (Flower's SecAgg+ state and this module's).
        call_next: the rest of the ClientApp (training), for the collect stage.
        min_round_sites: site.yaml ``federation.min_round_sites``.
        signer: the roster and this site's key (``SiteSigner.for_site``), or None without a roster.
        collects: the folder where the site notes each round it trained for (``note_collect``).
        offers_evaluation: asked at the setup stage only: whether this site can release its evaluation
            counts this round (it allows it and has validation slides).
    """
    if is_survivors_request(msg):
        return answer_survivors(msg, context, min_round_sites, signer)
    stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
    state = check_stage(msg, context, min_round_sites, signer, offers_evaluation)
    masked = None
    if stage == Stage.COLLECT_MASKED_VECTORS:  # noted before training: a try that fails is not retried either
        note_collect(collects, int(state["run"]), str(state["group"]))
        masked = MaskedSum(every_site_offered=set(state["offers"]) == set(state["partners"]))
    collecting = _MASKED_SUM.set(masked)
    try:
        reply = secaggplus_mod(msg, context, call_next)
    finally:
        _MASKED_SUM.reset(collecting)
    if not reply.has_error():  # commit only what Flower's mod accepted too
        sign_reply(stage, reply, state, signer)
        context.state.config_records[STATE] = state
        if stage == Stage.SETUP:
            groups = context.state.config_records.get(GROUPS) or ConfigRecord({"groups": []})
            groups["groups"] = [*groups["groups"], str(state["group"])]
            context.state.config_records[GROUPS] = groups
    return reply


def check_stage(msg: Message, context: Context, min_round_sites: int, signer: SiteSigner | None,
                offers_evaluation: Callable[[], bool] = lambda: False) -> ConfigRecord:
    """Checks one incoming SecAgg+ stage message; raises UnsafeRound when the site must refuse it.
    Returns the site's round record as it will be if the stage succeeds (the context is not touched).
    ``offers_evaluation`` is asked at the setup stage (``secure_stage``)."""
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)
    if stage not in (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK):
        name = server_label(stage) if isinstance(stage, str) else type(stage).__name__
        raise UnsafeRound(f"an unknown SecAgg+ stage {name!r}")  # before Flower's mod writes it into its error
    if stage == Stage.SETUP:
        state = _check_setup(msg, configs, context, min_round_sites)
        state["offered"] = bool(offers_evaluation())
        return state
    state = _round_state(msg, context, stage)
    if stage == Stage.SHARE_KEYS:
        _check_share_keys(msg, configs, state, min_round_sites, signer)
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        if "partners" not in state or "offers" not in state:  # before note_collect spends the round
            raise UnsafeRound("a collect stage before this site took the round's share-keys stage")
        _check_pairing(configs, state, signer, msg)
        state["instructions"] = instructions_digest(msg.content)
    elif stage == Stage.UNMASK:
        _check_unmask(configs, state, min_round_sites, signer, msg)
    return state


def sign_reply(stage: str, reply: Message, state: ConfigRecord, signer: SiteSigner | None) -> None:
    """After Flower's mod answered ``stage``: note it in ``state`` and add this site's signed statement."""
    if stage == Stage.COLLECT_MASKED_VECTORS:
        state["masked"] = True
    if stage == Stage.SETUP:  # the offer goes out with or without a roster (then on the server's word)
        reply.content.config_records[RECORD] = ConfigRecord({EVALUATION_OFFER: bool(state["offered"])})
    if signer is None:
        return
    run, group = int(state["run"]), str(state["group"])
    if stage == Stage.SETUP:
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        statement = key_statement(run, group, int(state["node"]), configs[Key.PUBLIC_KEY_1],
                                  configs[Key.PUBLIC_KEY_2], bool(state["offered"]))
        reply.content.config_records[RECORD].update({KEY_SIGNATURE: sign(signer.key, statement),
                                                     SIGNER: signer.public})
    elif stage == Stage.SHARE_KEYS:
        reply.content.config_records[RECORD] = ConfigRecord({VIEW_SIGNATURE: sign(signer.key, state["view"])})


def answer_survivors(msg: Message, context: Context, min_round_sites: int, signer: SiteSigner | None) -> Message:
    """Sign the set of sites whose masked vectors the server says it will sum: one set per round."""
    state = _round_state(msg, context, SURVIVORS_STAGE)
    survivors = sorted(set(int(n) for n in msg.content.config_records[RECORD].get(SURVIVORS_KEY, [])))
    partners = set(int(n) for n in state.get("partners", []))
    if not state.get("masked"):
        raise UnsafeRound("asked to sign the survivors before this site sent its masked vector")
    if int(state["node"]) not in survivors:
        raise UnsafeRound("this site, which sent its masked vector, is missing from the survivors")
    if not set(survivors) <= partners:
        raise UnsafeRound(f"survivors {sorted(set(survivors) - partners)} are not sites of this round")
    if len(survivors) < max(int(state["threshold"]), min_round_sites):
        raise UnsafeRound(f"a sum of {len(survivors)} sites; this site requires at least "
                          f"{max(int(state['threshold']), min_round_sites)}")
    signed = state.get("survivors")
    if signed is not None and sorted(int(n) for n in signed) != survivors:
        raise UnsafeRound(f"asked to sign survivors {survivors} after signing {sorted(signed)} in the same round")
    state["survivors"] = survivors
    record = ConfigRecord()
    if signer is not None:
        record[SURVIVORS_SIGNATURE] = sign(signer.key, survivors_statement(
            int(state["run"]), str(state["group"]), state["view"], survivors, state["instructions"]))
    context.state.config_records[STATE] = state
    return Message(RecordDict({RECORD: record}), reply_to=msg)


def _check_setup(msg: Message, configs, context: Context, min_round_sites: int) -> ConfigRecord:
    if not ROUND_ID.fullmatch(msg.metadata.group_id):  # kept in the context for the whole run (GROUPS)
        raise UnsafeRound(f"a round id of {len(msg.metadata.group_id)} characters that are not all letters, digits, "
                          "'.', '_' or '-' (Flower's are round numbers)")
    sites, threshold = int(configs.get(Key.SAMPLE_NUMBER, 0)), int(configs.get(Key.THRESHOLD, 0))
    shares = int(configs.get(Key.SHARE_NUMBER, 0))
    if sites < min_round_sites:
        raise UnsafeRound(f"{sites} sites in the round; this site requires at least {min_round_sites} "
                          "(federation.min_round_sites)")
    if shares != sites:
        raise UnsafeRound(f"{shares} shares for {sites} sites: this site is paired with every site of a round")
    if threshold < strict_majority(sites):
        raise UnsafeRound(f"reconstruction threshold {threshold} with {sites} sites: fewer than a strict majority "
                          "could unmask a site's update")
    groups = context.state.config_records.get(GROUPS)
    if groups is not None and msg.metadata.group_id in groups["groups"]:
        raise UnsafeRound(f"a second setup of round {msg.metadata.group_id!r}: each round is set up once")
    return ConfigRecord({"run": msg.metadata.run_id, "group": msg.metadata.group_id,
                         "node": msg.metadata.dst_node_id, "sites": sites, "threshold": threshold,
                         "settings": settings_statement(configs, Key.STAGE)})


def _round_state(msg: Message, context: Context, stage: str) -> ConfigRecord:
    """A copy of the site's round record, for this stage's message of the same run, round and node."""
    name = server_label(stage) if isinstance(stage, str) else type(stage).__name__  # for the site's log
    state = context.state.config_records.get(STATE)
    if state is None:
        raise UnsafeRound(f"SecAgg+ stage {name!r} without a setup stage")
    state = ConfigRecord(dict(state.items()))
    if msg.metadata.dst_node_id != int(state["node"]):
        raise UnsafeRound(f"stage {name!r} addressed to node {msg.metadata.dst_node_id}, not this site's")
    if (msg.metadata.run_id, msg.metadata.group_id) != (int(state["run"]), str(state["group"])):
        raise UnsafeRound(f"stage {name!r} of round {server_label(msg.metadata.group_id)!r} while round "
                          f"{state['group']!r} is under way")
    return state


def _check_share_keys(msg: Message, configs, state: ConfigRecord, min_round_sites: int,
                      signer: SiteSigner | None) -> None:
    nodes = [node for node in configs.keys() if node != Key.STAGE]
    if not all(NODE_ID.fullmatch(node) for node in nodes):
        raise UnsafeRound("a share-keys list whose keys are not all node ids")
    keys = {int(node): (value[0], value[1]) for node, value in configs.items() if node != Key.STAGE}
    if not min_round_sites <= len(keys) <= int(state["sites"]):
        raise UnsafeRound(f"public keys of {len(keys)} sites in a round announced with {state['sites']}; this "
                          f"site requires at least {min_round_sites} (federation.min_round_sites)")
    signatures = msg.content.config_records.get(RECORD) or {}
    offers = _offers(signatures.get(OFFERS, []), keys)
    if (int(state["node"]) in offers) != bool(state["offered"]):
        raise UnsafeRound("the share-keys list misstates whether this site offered its evaluation counts")
    state["partners"] = sorted(keys)
    state["offers"] = offers
    state["view"] = view_statement(int(state["run"]), str(state["group"]), keys, state["settings"], offers)
    if set(offers) != set(keys):
        log.info("SecAgg+ round %s: %d of the %d sites offer their evaluation counts; this site releases none of "
                 "its own this round", state["group"], len(offers), len(keys))
    if signer is None:
        log.warning("SecAgg+ round %s: no consortium roster (federation.roster): the other sites' keys are taken "
                    "on the server's word", state["group"])
        return
    signers: list[bytes] = []
    for node, (pk1, pk2) in sorted(keys.items()):
        entry = signatures.get(str(node))
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(b, bytes) for b in entry)):
            raise UnsafeRound(f"node {node}'s keys come without a member's signature")
        signature, member = entry
        public = signer.roster.public_key(member)
        if public is None:
            raise UnsafeRound(f"node {node}'s keys are signed by a key that is not on the consortium roster")
        if member in signers:
            raise UnsafeRound(f"one member hospital ({signer.roster.members[member.decode()]}) signed the keys "
                              "of two nodes")
        if node == int(state["node"]) and member != signer.public:
            raise UnsafeRound("this site's own keys come signed by another member")
        if not verifies(public, signature, key_statement(int(state["run"]), str(state["group"]), node, pk1, pk2,
                                                         node in offers)):
            raise UnsafeRound(f"node {node}'s key signature does not verify")
        signers.append(member)
    state["signers"] = signers


def _offers(value: object, keys: dict[int, tuple[bytes, bytes]]) -> list[int]:
    """The share-keys message's list of nodes that offered their evaluation counts: distinct sites of the list."""
    if not (isinstance(value, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in value)):
        raise UnsafeRound("a share-keys list whose evaluation offers are not a list of node ids")
    if len(set(value)) != len(value) or not set(value) <= set(keys):
        raise UnsafeRound("evaluation offers of nodes that are not sites of this round, or twice")
    return sorted(value)


def _member_of(state: ConfigRecord, signer: SiteSigner, node: int):
    partners = [int(n) for n in state["partners"]]
    return signer.roster.public_key(state["signers"][partners.index(node)])


def _check_pairing(configs, state: ConfigRecord, signer: SiteSigner | None, msg: Message) -> None:
    sources = [int(n) for n in configs.get(Key.SOURCE_LIST, [])]
    partners = set(int(n) for n in state.get("partners", [])) - {int(state["node"])}
    if len(set(sources)) != len(sources) or set(sources) != partners:
        raise UnsafeRound(f"encrypted shares of {len(set(sources) & partners)} of the {len(partners)} other sites "
                          "of this round: this site would be masked with only some of them")
    if signer is None:
        return
    signatures = msg.content.config_records.get(RECORD) or {}
    for node in sources:
        signature = signatures.get(str(node))
        if not isinstance(signature, bytes) or not verifies(_member_of(state, signer, node), signature,
                                                           state["view"]):
            raise UnsafeRound(f"node {node} did not sign the list of sites and keys this site received: the "
                              "server may be showing different rounds to different sites")


def _check_unmask(configs, state: ConfigRecord, min_round_sites: int, signer: SiteSigner | None,
                  msg: Message) -> None:
    active = set(int(n) for n in configs.get(Key.ACTIVE_NODE_ID_LIST, []))
    dropped = set(int(n) for n in configs.get(Key.DEAD_NODE_ID_LIST, []))
    if active & dropped:
        raise UnsafeRound(f"sites {sorted(active & dropped)} named both active and dropped")
    if int(state["node"]) in dropped:
        raise UnsafeRound("this site, which sent its masked vector, named as dropped")
    if len(active) < min_round_sites:
        raise UnsafeRound(f"a sum of {len(active)} sites' updates; this site requires at least {min_round_sites} "
                          "(federation.min_round_sites)")
    signed = state.get("survivors")
    if signer is not None and signed is None:
        raise UnsafeRound("an unmask request before this site signed the round's survivors")
    if signed is not None and active != set(int(n) for n in signed):
        raise UnsafeRound("the unmask request's active sites are not the survivors this site signed")
    if signed is not None and dropped != set(int(n) for n in state.get("partners", [])) - active:
        raise UnsafeRound("the unmask request's dropped sites are not the rest of this round's sites")
    if signer is None:
        return
    statement = survivors_statement(int(state["run"]), str(state["group"]), state["view"], sorted(active),
                                    state["instructions"])
    signatures = msg.content.config_records.get(RECORD) or {}
    # Every survivor, not a majority: with a majority, sites the server showed other instructions (a learning
    # rate of 1e-30) would reveal the shares that unmask the one site that trained, as a "sum".
    unsigned = sorted(node for node in active
                      if not (isinstance(signatures.get(str(node)), bytes)
                              and verifies(_member_of(state, signer, node), signatures[str(node)], statement)))
    if unsigned:
        raise UnsafeRound(f"survivors {unsigned} did not sign these survivors after training on the plan and model "
                          "this site trained on; shares are revealed only when every survivor did")
