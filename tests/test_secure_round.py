"""A server that does not follow SecAgg+, played in one process against five sites running their
real checks (client/secure_round.py), Flower's real secaggplus_mod and real P-384 signatures.

The server here is this test: it builds each stage's messages the way Flower's workflow does and
relays signatures with the product's SignatureRelay, and each attack changes what one site is
shown. Every attack must end in that site's refusal before it reveals anything; the honest round
must pass every stage. (The same checks against a patched ServerApp over real processes:
tests/test_curious_server.py.)
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from client.secure_round import (
    STATE,
    SiteSigner,
    UnsafeRound,
    may_release_evaluation,
    secure_stage,
    training_for_a_masked_sum,
)
from server.secure_aggregation import SignatureRelay
from shared import signed_secagg as signed
from shared.signed_secagg import Roster, RosterError, key_statement, sign
from shared.site_keys import public_key_line
from tests.flower_messages import RUN_ID, fit_reply, server_message_to

NODES = [11, 12, 13, 14, 15]
VICTIM, GROUP, MIN_SITES = 11, "3", 3
SETUP = {Key.SAMPLE_NUMBER: 5, Key.SHARE_NUMBER: 5, Key.THRESHOLD: 3, Key.CLIPPING_RANGE: 8.0,
         Key.TARGET_RANGE: 2**16, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 1000.0}


def _key_file(folder: Path, name: str) -> tuple[Path, str]:
    key = ec.generate_private_key(ec.SECP384R1())
    path = folder / f"{name}.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    return path, f"{public_key_line(key.public_key())} {name}"


@pytest.fixture(scope="module")
def signers(tmp_path_factory):
    folder = tmp_path_factory.mktemp("roster")
    keys = {node: _key_file(folder, f"site-{node}") for node in NODES}
    roster = folder / "roster.pub"
    roster.write_text("# the consortium's members\n" + "".join(f"{line}\n" for _, line in keys.values()))
    return {node: SiteSigner.for_site(roster, path) for node, (path, _) in keys.items()}


class SitsOut(Exception):
    """What client/app.py's SiteClient raises when a site sits a masked round out (a refusal code leaves)."""


class Site:
    def __init__(self, node: int, signer: SiteSigner | None, sits_out: bool = False, collects: Path | None = None,
                 offers: bool = True, min_sites: int = MIN_SITES):
        self.node, self.signer, self.sits_out, self.offers = node, signer, sits_out, offers
        self.min_sites = min_sites  # site.yaml federation.min_round_sites
        self.collects = collects or Path(tempfile.mkdtemp(prefix=f"secagg-{node}-"))  # where it notes its rounds
        self.context = Context(run_id=RUN_ID, node_id=node, node_config={}, state=RecordDict(), run_config={})
        self.refusal: str | None = None
        self.trained_for_a_masked_sum: list[bool] = []
        self.may_release: list[bool] = []  # what its training was told about its evaluation counts

    def train(self, message: Message, _context) -> Message:
        self.trained_for_a_masked_sum.append(training_for_a_masked_sum())
        self.may_release.append(may_release_evaluation())
        if self.sits_out and training_for_a_masked_sum():
            raise SitsOut
        return fit_reply(message, {}, examples=1, arrays=True)

    def handle(self, message: Message) -> Message | None:
        if self.refusal is not None:
            return None
        try:
            return secure_stage(message, self.context, self.train, self.min_sites, self.signer, self.collects,
                                offers_evaluation=lambda: self.offers)
        except UnsafeRound as refusal:
            self.refusal = str(refusal)
            return None
        except SitsOut:
            self.refusal = "sat out"
            return None


def _stage(node: int, configs: dict, instructions: dict | None = None) -> Message:
    return server_message_to(node, RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs), **(instructions or {})}),
                             GROUP)


def _instructions() -> dict:
    """What the collect stage carries besides SecAgg+'s configs (Flower's legacy names): the plan, the model."""
    return {"fitins.config": ConfigRecord({"fedpath-plan": '{"learning_rate": 0.001, "round": 1}'}),
            "fitins.parameters": ArrayRecord({"0": Array(np.linspace(0, 1, 6, dtype=np.float32))})}


class Server:
    """Flower's SecAgg+ workflow stage by stage, with the product's relay; ``tamper(stage, messages)``
    is the attack: it may change any message before it is sent."""

    def __init__(self, sites: dict[int, Site], tamper=None):
        self.sites, self.relay = sites, SignatureRelay()
        self.tamper = tamper or (lambda stage, messages: messages)

    def exchange(self, stage: str, messages: list[Message]) -> dict[int, Message]:
        messages = self.tamper(stage, self.relay.attach(messages))
        replies = {m.metadata.dst_node_id: self.sites[m.metadata.dst_node_id].handle(m) for m in messages}
        replies = {node: reply for node, reply in replies.items() if reply is not None}
        self.relay.observe(list(replies.values()))
        return replies

    def collect_message(self, node: int) -> Message:
        sources, ciphertexts = self.forwarded[node]
        return _stage(node, {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.SOURCE_LIST: sources,
                             Key.CIPHERTEXT_LIST: ciphertexts}, _instructions())

    def run(self) -> dict[int, Message]:
        nodes = sorted(self.sites)
        keys = self.exchange(Stage.SETUP, [_stage(n, {Key.STAGE: Stage.SETUP, **SETUP}) for n in nodes])
        public = {n: [r.content.config_records[RECORD_KEY_CONFIGS][Key.PUBLIC_KEY_1],
                      r.content.config_records[RECORD_KEY_CONFIGS][Key.PUBLIC_KEY_2]] for n, r in keys.items()}
        self.public = public
        shared = self.exchange(Stage.SHARE_KEYS, [
            _stage(n, {Key.STAGE: Stage.SHARE_KEYS, **{str(m): public[m] for m in public}}) for n in public])
        forwarded: dict[int, tuple[list[int], list[bytes]]] = {n: ([], []) for n in shared}
        for source, reply in shared.items():
            configs = reply.content.config_records[RECORD_KEY_CONFIGS]
            for target, ciphertext in zip(configs[Key.DESTINATION_LIST], configs[Key.CIPHERTEXT_LIST], strict=True):
                if target in forwarded:
                    forwarded[target][0].append(source)
                    forwarded[target][1].append(ciphertext)
        self.forwarded = forwarded
        masked = self.exchange(Stage.COLLECT_MASKED_VECTORS, [self.collect_message(n) for n in forwarded])
        self.survivors = sorted(masked)
        survivors = sorted(masked)
        request = {signed.STAGE_KEY: signed.SURVIVORS_STAGE, signed.SURVIVORS_KEY: survivors}
        self.exchange(signed.SURVIVORS_STAGE, [
            server_message_to(n, RecordDict({signed.RECORD: ConfigRecord(dict(request))}), GROUP) for n in survivors])
        return self.exchange(Stage.UNMASK, [
            _stage(n, {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: survivors,
                       Key.DEAD_NODE_ID_LIST: sorted(set(shared) - set(survivors))}) for n in survivors])


def _sites(signers, roster: bool = True, sitting_out: tuple[int, ...] = ()) -> dict[int, Site]:
    return {node: Site(node, signers[node] if roster else None, node in sitting_out) for node in NODES}


def _configs(message: Message) -> ConfigRecord:
    return message.content.config_records[RECORD_KEY_CONFIGS]


def test_an_honest_round_passes_every_stage_and_reveals_shares(signers):
    sites = _sites(signers)
    unmasked = Server(sites).run()
    assert [s.refusal for s in sites.values()] == [None] * 5
    assert sorted(unmasked) == NODES
    shares = _configs(unmasked[VICTIM])
    assert sorted(shares[Key.NODE_ID_LIST]) == NODES and len(shares[Key.SHARE_LIST]) == 5


def _rename_offer(message: Message, old: int, new: int) -> None:
    """The share-keys message's evaluation offers, with node ``old`` renamed ``new`` (as a tampering server would)."""
    record = message.content.config_records[signed.RECORD]
    record[signed.OFFERS] = sorted(new if node == old else node for node in record[signed.OFFERS])


def _victim_refusal(signers, stage: str, change) -> str | None:
    """Run a round in which the server applies ``change`` to the victim's message of ``stage``."""
    def tamper(current, messages):
        for message in messages:
            if current == stage and message.metadata.dst_node_id == VICTIM:
                change(message)
        return messages

    sites = _sites(signers)
    Server(sites, tamper).run()
    return sites[VICTIM].refusal


def test_a_site_the_server_invents_is_refused(signers):
    """Sybil: the server adds keys of its own (signed with a key it made) to the victim's list."""
    fake_key = ec.generate_private_key(ec.SECP384R1())
    fake_public = public_key_line(fake_key.public_key()).encode()

    def invent(message):
        configs = _configs(message)
        pk1, pk2 = configs.pop(str(15))
        configs["99"] = [pk1, pk2]
        statement = key_statement(RUN_ID, GROUP, 99, pk1, pk2, True)
        message.content.config_records[signed.RECORD]["99"] = [sign(fake_key, statement), fake_public]
        _rename_offer(message, 15, 99)

    assert "not on the consortium roster" in _victim_refusal(signers, Stage.SHARE_KEYS, invent)


def test_a_member_signature_reused_for_another_node_is_refused(signers):
    """The server cannot move a real member's signature onto a node id of its choosing."""
    def move(message):
        configs, signatures = _configs(message), message.content.config_records[signed.RECORD]
        configs["99"], signatures["99"] = configs.pop(str(15)), signatures.pop(str(15))
        _rename_offer(message, 15, 99)

    assert "signature does not verify" in _victim_refusal(signers, Stage.SHARE_KEYS, move)


def test_pairing_a_site_with_only_some_others_is_refused(signers):
    """The victim is shown the other sites' shares except two, so its mask would involve only two partners."""
    def keep_two(message):
        configs = _configs(message)
        configs[Key.SOURCE_LIST] = configs[Key.SOURCE_LIST][:2]
        configs[Key.CIPHERTEXT_LIST] = configs[Key.CIPHERTEXT_LIST][:2]

    assert "masked with only some of them" in _victim_refusal(signers, Stage.COLLECT_MASKED_VECTORS, keep_two)


def test_a_different_list_of_sites_for_one_site_is_refused(signers):
    """The victim's round has four sites (node 15 left out), the others' five: its partners signed
    another list than the one it received, so it never sends its masked vector."""
    def tamper(stage, messages):
        for message in messages:
            if stage == Stage.SHARE_KEYS and message.metadata.dst_node_id == VICTIM:
                del _configs(message)[str(15)], message.content.config_records[signed.RECORD][str(15)]
                offers = message.content.config_records[signed.RECORD]
                offers[signed.OFFERS] = [node for node in offers[signed.OFFERS] if node != 15]
            if stage == Stage.COLLECT_MASKED_VECTORS and message.metadata.dst_node_id == VICTIM:
                configs = _configs(message)
                keep = [i for i, source in enumerate(configs[Key.SOURCE_LIST]) if source != 15]
                configs[Key.SOURCE_LIST] = [configs[Key.SOURCE_LIST][i] for i in keep]
                configs[Key.CIPHERTEXT_LIST] = [configs[Key.CIPHERTEXT_LIST][i] for i in keep]
        return messages

    sites = _sites(signers)
    Server(sites, tamper).run()
    assert "did not sign the list of sites and keys this site received" in sites[VICTIM].refusal


def test_unmasking_for_a_smaller_set_than_the_signed_survivors_is_refused(signers):
    """After all five signed the survivors, the server asks three sites to treat node 15 as dropped
    (which would reveal its key and let the server read a sum without it): they refuse."""
    def tamper(stage, messages):
        for message in messages:
            if stage == Stage.UNMASK and message.metadata.dst_node_id in (11, 12, 13):
                configs = _configs(message)
                configs[Key.ACTIVE_NODE_ID_LIST] = [11, 12, 13, 14]
                configs[Key.DEAD_NODE_ID_LIST] = [15]
        return messages

    sites = _sites(signers)
    unmasked = Server(sites, tamper).run()
    assert sorted(unmasked) == [14, 15]
    assert all("not the survivors this site signed" in sites[n].refusal for n in (11, 12, 13))


def test_survivors_signed_by_a_minority_are_not_unmasked(signers):
    """The server shows two sites one set of survivors and three sites another: no set is signed by a
    strict majority that includes the two, so they reveal nothing for theirs."""
    def tamper(stage, messages):
        for message in messages:
            node = message.metadata.dst_node_id
            if stage == signed.SURVIVORS_STAGE and node in (11, 12):
                message.content.config_records[signed.RECORD][signed.SURVIVORS_KEY] = [11, 12, 13]
            if stage == Stage.UNMASK and node in (11, 12):
                configs = _configs(message)
                configs[Key.ACTIVE_NODE_ID_LIST], configs[Key.DEAD_NODE_ID_LIST] = [11, 12, 13], [14, 15]
        return messages

    sites = _sites(signers)
    unmasked = Server(sites, tamper).run()
    assert 11 not in unmasked and 12 not in unmasked
    assert "survivors [13] did not sign these survivors" in sites[11].refusal


@pytest.mark.parametrize("record", ["fitins.config", "fitins.parameters"])
def test_sites_shown_another_plan_or_model_reveal_nothing_for_the_site_that_trained_on_the_real_one(signers,
                                                                                                   record):
    """Four sites train at a millionth of the learning rate (or on another model), the victim on the real
    plan: the "sum" would be the victim's update. With a majority rule the four would reveal the shares that
    unmask it; each survivor signed a digest of what it trained on, and every site needs every survivor's
    signature on its own."""
    def tamper(stage, messages):
        for message in messages:
            if stage == Stage.COLLECT_MASKED_VECTORS and message.metadata.dst_node_id != VICTIM:
                if record == "fitins.config":
                    message.content.config_records[record]["fedpath-plan"] = '{"learning_rate": 1e-09, "round": 1}'
                else:
                    message.content.array_records[record]["0"] = Array(np.zeros(6, dtype=np.float32))
        return messages

    sites = _sites(signers)
    server = Server(sites, tamper)
    assert server.run() == {}
    assert server.survivors == NODES  # all five trained and sent their masked vectors
    assert "survivors [12, 13, 14, 15] did not sign" in sites[VICTIM].refusal
    assert all("survivors [11] did not sign" in sites[n].refusal for n in NODES if n != VICTIM)


def test_the_digest_of_what_a_site_trained_on_ignores_the_per_site_records_but_not_the_arrays_order():
    one = RecordDict({**_instructions(), RECORD_KEY_CONFIGS: ConfigRecord({Key.SOURCE_LIST: [1, 2]})})
    other = RecordDict({"fitins.parameters": _instructions()["fitins.parameters"],
                        "fitins.config": _instructions()["fitins.config"],
                        RECORD_KEY_CONFIGS: ConfigRecord({Key.SOURCE_LIST: [3]}),
                        signed.RECORD: ConfigRecord({"x": b"y"})})
    per_site = (RECORD_KEY_CONFIGS, signed.RECORD)
    assert signed.instructions_digest(one, per_site) == signed.instructions_digest(other, per_site)
    other.array_records["fitins.parameters"]["0"] = Array(np.linspace(0, 1, 6, dtype=np.float64))
    assert signed.instructions_digest(one, per_site) != signed.instructions_digest(other, per_site)  # dtype too
    # training reads a record's arrays in their order: the same arrays in another order are another model
    a, b = Array(np.zeros(2, dtype=np.float32)), Array(np.ones(3, dtype=np.float32))
    ordered = RecordDict({"fitins.parameters": ArrayRecord({"0": a, "1": b})})
    swapped = RecordDict({"fitins.parameters": ArrayRecord({"1": b, "0": a})})
    assert signed.instructions_digest(ordered, per_site) != signed.instructions_digest(swapped, per_site)


def test_sites_given_other_secagg_settings_send_no_masked_vector(signers):
    """Flower's mod quantises with the maximum weight of each site's own setup message: the others told 1e12
    scale their updates to zero, and the sum would be the victim's. The settings are part of the signed view,
    so no partner's view signature verifies at any site, and none sends its masked vector."""
    def tamper(stage, messages):
        for message in messages:
            if stage == Stage.SETUP and message.metadata.dst_node_id != VICTIM:
                _configs(message)[Key.MAX_WEIGHT] = 1e12
        return messages

    sites = _sites(signers)
    server = Server(sites, tamper)
    assert server.run() == {} and server.survivors == []
    assert all("did not sign the list of sites and keys" in site.refusal for site in sites.values())


def test_a_site_trains_once_a_round_even_after_sitting_out(signers):
    """A server that resends the collect stage would make a site train (and spend privacy) again in the same
    round; a site that sat out is not moved on by Flower's mod, so the site counts the tries itself."""
    sites = _sites(signers, sitting_out=(15,))
    server = Server(sites)
    server.run()
    assert sites[15].refusal == "sat out"
    sites[15].refusal = None
    (resent,) = server.relay.attach([server.collect_message(15)])  # with the partners' view signatures
    assert sites[15].handle(resent) is None
    assert "a second collect stage in round 3" in sites[15].refusal
    assert sites[15].trained_for_a_masked_sum == [True]  # trained (and sat out) once


def test_a_site_that_sits_out_answers_no_masked_vector_and_is_not_summed(signers):
    """Sites 14 and 15 sit the round out (their budgets): they send their code, not masked zeros, so the
    sum is over the three that trained, and only the collect stage's training is for a masked sum."""
    sites = _sites(signers, sitting_out=(14, 15))
    server = Server(sites)
    unmasked = server.run()
    assert server.survivors == [11, 12, 13] and sorted(unmasked) == [11, 12, 13]
    assert _configs(unmasked[VICTIM])[Key.NODE_ID_LIST]  # shares revealed: of 14 and 15's keys, as dropped sites
    assert sites[14].refusal == sites[15].refusal == "sat out"
    assert sites[VICTIM].trained_for_a_masked_sum == [True] and not training_for_a_masked_sum()


def test_too_few_sites_that_trained_reveal_nothing(signers):
    """Three of five sit out: a "sum" of two sites' updates, below every site's min_round_sites (3)."""
    sites = _sites(signers, sitting_out=(13, 14, 15))
    server = Server(sites)
    assert server.run() == {}
    assert server.survivors == [11, 12]
    assert all("a sum of 2 sites; this site requires at least 3" in sites[n].refusal for n in (11, 12))


@pytest.mark.parametrize("victim_min_sites, exposed", [(3, True), (4, False)])
def test_two_colluding_sites_and_the_server_need_a_round_the_victim_allows_to_end_with_three(signers,
                                                                                            victim_min_sites, exposed):
    """The server reports the honest 14 and 15 as dropped after key sharing and sums only 11 with the colluders
    12 and 13, who subtract their own vectors from the sum. Only the victim's own min_round_sites stops it:
    at 3 (the default) it unmasks a sum of three, at 4 (c + 2 for c = 2 colluders) it refuses."""
    def tamper(stage, messages):
        if stage == Stage.COLLECT_MASKED_VECTORS:  # 14 and 15 never get their collect message: "dropped"
            return [m for m in messages if m.metadata.dst_node_id in (11, 12, 13)]
        return messages

    sites = _sites(signers)
    sites[11].min_sites = victim_min_sites
    server = Server(sites, tamper)
    unmasked = server.run()
    assert server.survivors == [11, 12, 13]
    assert (11 in unmasked) is exposed  # its shares of the colluders' masks, which remove them from the sum
    if not exposed:
        assert "a sum of 3 sites; this site requires at least 4" in sites[11].refusal


def test_a_site_signs_one_set_of_survivors_per_round(signers):
    sites = _sites(signers)
    server = Server(sites)
    server.run()
    again = server_message_to(VICTIM, RecordDict({signed.RECORD: ConfigRecord(
        {signed.STAGE_KEY: signed.SURVIVORS_STAGE, signed.SURVIVORS_KEY: [11, 12, 13]})}), GROUP)
    assert sites[VICTIM].handle(again) is None
    assert "after signing" in sites[VICTIM].refusal


def test_roster_errors_name_the_file_and_line(tmp_path, signers):
    member = next(iter(signers.values())).public.decode()
    bad = tmp_path / "roster.pub"
    bad.write_text(f"{member} a\nssh-rsa AAAAB3NzaC1yc2E b\n")
    with pytest.raises(RosterError, match=r"roster.pub:2"):
        Roster.load(bad)
    bad.write_text(f"{member} a\n{member} b\n")
    with pytest.raises(RosterError, match=r"roster.pub:2: the key of 'a' again"):
        Roster.load(bad)
    bad.write_text(f"{member} a\n")
    with pytest.raises(RosterError, match="1 member key"):
        Roster.load(bad)


def test_a_site_whose_own_key_is_not_on_the_roster_cannot_start(tmp_path, signers):
    path, _ = _key_file(tmp_path, "outsider")
    roster = tmp_path / "roster.pub"
    roster.write_text("".join(f"{s.public.decode()}\n" for s in list(signers.values())[:2]))
    with pytest.raises(UnsafeRound, match="not on the consortium roster"):
        SiteSigner.for_site(roster, path)


def test_a_roster_or_key_changed_within_one_timestamp_is_read_again(tmp_path, signers):
    """The task runner lives for weeks: a roster from which a member was removed must count from the next round,
    also when the edit kept the file's size and modification time (set back, or within one timestamp tick),
    and a replaced signing key must sign from then on."""
    import os

    members = [s.public.decode() for s in signers.values()]
    path, own = _key_file(tmp_path, "own")
    roster = tmp_path / "roster.pub"
    roster.write_text("".join(f"{line} m{i}\n" for i, line in enumerate(members[:3])) + f"{own}\n")
    first = SiteSigner.for_site(roster, path)
    assert len(first.roster.members) == 4 and SiteSigner.for_site(roster, path) is first  # unchanged: kept
    stat = roster.stat()
    with roster.open("r+") as handle:  # member m0 swapped for m3, in place: same size, same mtime
        handle.write(f"{members[3]} m0\n")
    os.utime(roster, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert roster.stat().st_size == stat.st_size and roster.stat().st_mtime_ns == stat.st_mtime_ns
    second = SiteSigner.for_site(roster, path)
    assert members[3] in second.roster.members and members[0] not in second.roster.members
    replacement, line = _key_file(tmp_path, "replacement")
    with roster.open("a") as handle:  # the new key is a member too; from here on the roster stays as it is
        handle.write(f"{line}\n")
    assert SiteSigner.for_site(roster, path).public.decode() == own.rsplit(" ", 1)[0]
    key_stat = path.stat()
    os.replace(replacement, path)  # the site's key pair replaced, same file name and modification time
    os.utime(path, ns=(key_stat.st_atime_ns, key_stat.st_mtime_ns))
    assert SiteSigner.for_site(roster, path).public.decode() == line.rsplit(" ", 1)[0]


def test_a_round_is_set_up_once(signers):
    """Restarting a round (a second setup with the same group) would give fresh keys and another view to
    sign; the site refuses it."""
    sites = _sites(signers)
    Server(sites).run()
    assert sites[VICTIM].handle(_stage(VICTIM, {Key.STAGE: Stage.SETUP, **SETUP})) is None
    assert "a second setup of round '3'" in sites[VICTIM].refusal


def test_a_stage_flower_refuses_leaves_the_sites_record_unchanged(signers):
    """A share-keys message after the round (Flower refuses it: wrong stage order) carries a smaller,
    validly signed list: the site's checks pass, but its record must keep the view it really had, or a
    server could make it sign survivors for another view."""
    sites = _sites(signers)
    server = Server(sites)
    server.run()
    before = dict(sites[VICTIM].context.state.config_records[STATE].items())
    configs = {Key.STAGE: Stage.SHARE_KEYS}
    signatures = {}
    for node in (11, 12, 13):  # the round's own keys and signatures, three of the five
        configs[str(node)] = server.public[node]
        signatures[str(node)] = server.relay.keys[node]
    message = _stage(VICTIM, configs)
    message.content.config_records[signed.RECORD] = ConfigRecord({**signatures, signed.OFFERS: [11, 12, 13]})
    with pytest.raises(ValueError, match="Abort secure aggregation"):  # Flower's, after the site's checks passed
        secure_stage(message, sites[VICTIM].context, lambda m, _: fit_reply(m, {}), MIN_SITES, signers[VICTIM],
                     sites[VICTIM].collects, offers_evaluation=lambda: True)
    assert dict(sites[VICTIM].context.state.config_records[STATE].items()) == before


@pytest.mark.parametrize("group", ["1" * 65, "3\nround 4"])
def test_a_round_id_that_is_not_a_short_plain_name_is_refused_at_setup(signers, group):
    """The site keeps every round id of a run in its context (one setup per round): a server must not grow it
    by megabytes per message."""
    site = Site(VICTIM, signers[VICTIM])
    setup = server_message_to(VICTIM, RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SETUP,
                                                                                   **SETUP})}), group)
    assert site.handle(setup) is None and f"a round id of {len(group)} characters" in site.refusal


def test_the_server_names_the_survivor_whose_signature_stops_the_unmasking(signers):
    """Every survivor must sign the survivors, so one hospital that signs something else stops the round; the
    sites only see that a signature is missing, the server (which relays them) names whose it is."""
    sites = _sites(signers)
    server = Server(sites)
    assert sorted(server.run()) == NODES
    sent = server.relay.instructions(server.survivors)  # what each survivor was sent, hashed as the sites hash it
    assert server.relay.unverified_survivors(server.survivors, sent) == []  # the server's statement is the sites'
    server.relay.survivors[13] = sign(signers[13].key, b"another statement")
    del server.relay.survivors[14]
    assert server.relay.unverified_survivors(server.survivors, sent) == [13, 14]


def test_a_site_notes_on_disk_each_round_it_trained_for(signers, tmp_path):
    """The run's context goes back to the SuperNode only after the reply; had that failed, a resent collect
    stage would find the context of before (the same masks) and a second masked vector would give away the
    difference of two updates. The site notes each round on disk before training, and refuses a second."""
    sites = _sites(signers)
    sites[VICTIM].collects = tmp_path / "secagg"
    saved = {}

    def keep_context(stage, messages):
        if stage == Stage.COLLECT_MASKED_VECTORS:  # the victim's context as the SuperNode would still hold it
            saved["context"] = copy.deepcopy(sites[VICTIM].context)
        return messages

    server = Server(sites, keep_context)
    assert sorted(server.run()) == NODES
    assert (tmp_path / "secagg" / f"run-{RUN_ID}.collects").read_text() == f"{GROUP}\n"
    sites[VICTIM].context = saved["context"]  # the context of before the collect stage came back
    (resent,) = server.relay.attach([server.collect_message(VICTIM)])  # with the partners' view signatures
    assert sites[VICTIM].handle(resent) is None
    assert "this site trained for it before" in sites[VICTIM].refusal
    assert sites[VICTIM].trained_for_a_masked_sum == [True]


@pytest.mark.parametrize("stage", ["x\n2026-12-05 INFO fedpath.site: forged line", 7])
def test_an_unknown_stage_is_refused_before_flowers_mod_and_named_plainly(signers, stage):
    site = Site(VICTIM, signers[VICTIM])
    assert site.handle(_stage(VICTIM, {Key.STAGE: stage})) is None
    assert "unknown SecAgg+ stage" in site.refusal and "\n" not in site.refusal


def test_a_share_keys_list_with_keys_that_are_not_node_ids_is_refused(signers):
    def tamper(stage, messages):
        for message in messages:
            if stage == Stage.SHARE_KEYS and message.metadata.dst_node_id == VICTIM:
                configs = _configs(message)
                configs["12\nforged"] = configs[str(12)]
        return messages

    sites = _sites(signers)
    Server(sites, tamper).run()
    assert sites[VICTIM].refusal == "a share-keys list whose keys are not all node ids"


@pytest.mark.parametrize("roster", [True, False])
def test_evaluation_counts_are_released_only_when_every_site_offered_them(signers, roster):
    """A site without validation slides (or with privacy.release_evaluation: false) sends zero counts; the
    others' "sum" of counts would then be over fewer sites than the update's, one site's own at worst.
    Each site offers or not at setup; training is told to release only when every site of the round offered."""
    everyone = _sites(signers, roster)
    Server(everyone).run()
    assert [s.refusal for s in everyone.values()] == [None] * 5
    assert all(s.may_release == [True] for s in everyone.values())

    sites = _sites(signers, roster)
    sites[15].offers = False  # one hospital keeps its counts (or has no validation slides)
    server = Server(sites)
    assert sorted(server.run()) == NODES  # the round goes on: the update is summed as before
    assert all(s.may_release == [False] for s in sites.values())  # nobody releases counts this round
    assert server.relay.offers == {11, 12, 13, 14}
    if roster:  # the server's own reading of the signed view agrees with the sites'
        assert server.relay.unverified_survivors(server.survivors, server.relay.instructions(server.survivors)) == []


def test_a_server_that_claims_a_site_offered_its_counts_is_refused(signers):
    """Node 15 did not offer; the server tells the victim that every site did, so that the victim releases its
    counts into a sum where 15 adds zeros. 15's keys come signed with its offer, so the claim does not verify."""
    def claim(message):
        record = message.content.config_records[signed.RECORD]
        record[signed.OFFERS] = sorted({*record[signed.OFFERS], 15})

    def tamper(stage, messages):
        for message in messages:
            if stage == Stage.SHARE_KEYS and message.metadata.dst_node_id == VICTIM:
                claim(message)
        return messages

    sites = _sites(signers)
    sites[15].offers = False
    Server(sites, tamper).run()
    assert "node 15's key signature does not verify" in sites[VICTIM].refusal
    assert sites[VICTIM].may_release == []  # it never trained


def test_a_server_that_hides_a_sites_offer_is_refused(signers):
    """The other direction: node 15 offered; the server tells the victim it did not (so that the victim
    withholds its counts while the others release theirs). 15's key signature covers its offer."""
    def hide(stage, messages):
        for message in messages:
            if stage == Stage.SHARE_KEYS and message.metadata.dst_node_id == VICTIM:
                record = message.content.config_records[signed.RECORD]
                record[signed.OFFERS] = [node for node in record[signed.OFFERS] if node != 15]
        return messages

    sites = _sites(signers)
    Server(sites, hide).run()
    assert "node 15's key signature does not verify" in sites[VICTIM].refusal
    assert sites[VICTIM].may_release == []


def test_a_collect_stage_before_the_share_keys_stage_is_refused_before_the_round_is_noted(signers, tmp_path):
    """A server that skips key sharing for one site: refused as unsafe, and the round is not noted as trained
    for (no partners, no offers: nothing to check a masked vector against)."""
    site = Site(VICTIM, signers[VICTIM], collects=tmp_path / "secagg")
    site.handle(_stage(VICTIM, {Key.STAGE: Stage.SETUP, **SETUP}))
    assert site.refusal is None
    site.handle(_stage(VICTIM, {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.SOURCE_LIST: [],
                                Key.CIPHERTEXT_LIST: []}, _instructions()))
    assert "before this site took the round's share-keys stage" in site.refusal
    assert not (tmp_path / "secagg").exists() and site.may_release == []


def test_a_site_whose_own_offer_is_misstated_refuses_even_without_a_roster(signers):
    """Without a roster the offers are the server's word, but a site knows its own: told that it did not offer,
    it would release nothing while the others do, or the other way round."""
    def deny(stage, messages):
        for message in messages:
            if stage == Stage.SHARE_KEYS and message.metadata.dst_node_id == VICTIM:
                record = message.content.config_records[signed.RECORD]
                record[signed.OFFERS] = [node for node in record[signed.OFFERS] if node != VICTIM]
        return messages

    sites = _sites(signers, roster=False)
    Server(sites, deny).run()
    assert "misstates whether this site offered its evaluation counts" in sites[VICTIM].refusal
