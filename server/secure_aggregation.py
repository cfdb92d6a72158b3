"""Flower's SecAgg+ workflow with a reconstruction threshold set every round, made to survive a site
that is already gone when a round starts.

**Threshold.** Flower takes the threshold as a number of sites or as a fraction of the shares,
rounded (0.51 of 4 sites gives 2): no fixed value is a strict majority for every round size. The
federation strategy tells this workflow how many sites it sampled (``round_size``) while the
setup stage runs, before the threshold is sent, and the threshold becomes
``secure_aggregation.threshold_for(n)``: a strict majority ``n // 2 + 1`` unless configured
higher (or, with the loudly logged ``allow_weak_threshold``, lower; sites refuse that anyway).

**Dropped before the setup.** Flower 1.42 keeps every sampled node in ``sampled_node_ids`` even
when it never answered the setup (or key-sharing) stage, and at unmasking tries to rebuild that
node's mask secret from shares nobody ever received: "Not enough shares to recover secret", and
the round halts. A site that died between rounds is still listed online until its heartbeat
expires, so it is sampled. Such a node never exchanged keys or shares, so no other site's mask
involves it: dropping it from the sampled set after those stages is exactly the protocol's own
handling of a site that was never sampled. Nodes that drop later (after sharing) are still
recovered by Flower as before.

**Signed statements.** Sites sign their SecAgg+ keys, the round's list of sites and the set of
survivors (``shared/signed_secagg.py``), and refuse a stage whose statements do not verify
against their roster (``client/secure_round.py``). This workflow only relays them: the
``SignatureRelay`` collects each site's signature from its reply and hands them to the next
stage's messages, and before unmasking one extra exchange asks every survivor to sign the set of
survivors. The server holds no key that could make any of these signatures. It relays each site's
offer of its evaluation counts the same way (signed with the site's keys): sites release their
counts only in a round every site of which offered them, and the run's log says when one did not.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.workflow import SecAggPlusWorkflow

from server.server_config import SecureAggregationConfig, ServerConfig
from shared import signed_secagg as signed
from shared.refusals import strict_majority

log = logging.getLogger("fedpath.server")


class SignatureRelay:
    """Carries the sites' signed statements from their replies to the next stage's messages.

    An observer of every exchange (``TimeoutGrid``) and a transformer of every outgoing message:
    setup replies give each node's key signature and its offer of its evaluation counts, share-keys
    replies its signature of the round's list of sites, survivors replies its signature of the
    survivors; they go out with the
    share-keys, collect and unmask messages. It forges nothing and checks nothing for the sites (they
    check for themselves); when the unmasking fails it names the survivors whose signature of the
    survivors stopped it (``unverified_survivors``).
    """

    def __init__(self) -> None:
        self.keys: dict[int, list[bytes]] = {}
        self.offers: set[int] = set()  # nodes whose setup reply offered their evaluation counts
        self.views: dict[int, bytes] = {}
        self.survivors: dict[int, bytes] = {}
        self.group = ""
        self.run_id = 0
        self.settings = b""  # what the round's setup told the sites (signed.settings_statement)
        self.round_keys: dict[int, tuple[bytes, bytes]] = {}  # the share-keys list the sites were shown
        self.collected: dict[int, RecordDict] = {}  # node -> the collect stage's content it was sent (Flower's own)

    def observe(self, replies: list[Message]) -> None:
        for reply in replies:
            record = reply.content.config_records.get(signed.RECORD) if reply.has_content() else None
            if record is None:
                continue
            node = reply.metadata.src_node_id
            if record.get(signed.EVALUATION_OFFER) is True:
                self.offers.add(node)
            if isinstance(record.get(signed.KEY_SIGNATURE), bytes) and isinstance(record.get(signed.SIGNER), bytes):
                self.keys[node] = [record[signed.KEY_SIGNATURE], record[signed.SIGNER]]
            if isinstance(record.get(signed.VIEW_SIGNATURE), bytes):
                self.views[node] = record[signed.VIEW_SIGNATURE]
            if isinstance(record.get(signed.SURVIVORS_SIGNATURE), bytes):
                self.survivors[node] = record[signed.SURVIVORS_SIGNATURE]

    def attach(self, messages: list[Message]) -> list[Message]:
        for message in messages:
            configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
            stage = configs.get(Key.STAGE) if configs is not None else None
            if stage == Stage.SETUP:  # a new round: nothing signed yet
                self.keys, self.views, self.survivors, self.collected = {}, {}, {}, {}
                self.offers, self.round_keys = set(), {}
                self.group, self.run_id = message.metadata.group_id, message.metadata.run_id
                self.settings = signed.settings_statement(configs, Key.STAGE)
            elif stage == Stage.SHARE_KEYS:
                nodes = [int(node) for node in configs.keys() if node != Key.STAGE]
                self.round_keys = {int(node): (value[0], value[1]) for node, value in configs.items()
                                   if node != Key.STAGE}
                self._add(message, {**{str(n): self.keys[n] for n in nodes if n in self.keys},
                                    signed.OFFERS: sorted(self.offers & set(nodes))})
            elif stage == Stage.COLLECT_MASKED_VECTORS:
                sources = [int(node) for node in configs.get(Key.SOURCE_LIST, [])]
                self.collected[message.metadata.dst_node_id] = message.content  # hashed only if the round fails
                self._add(message, {str(n): self.views[n] for n in sources if n in self.views})
            elif stage == Stage.UNMASK:
                self._add(message, {str(n): signature for n, signature in self.survivors.items()})
        return messages

    def every_site_offered(self) -> bool:
        """Whether every site of the current round offered its evaluation counts, so that the sites released
        them into the sum (``client/secure_round.py``); when not, the sum's counts are zeros, not a score."""
        return bool(self.round_keys) and set(self.round_keys) <= self.offers

    def instructions(self, survivors: list[int]) -> dict[int, bytes]:
        """The digest of what each survivor was sent in the collect stage (``signed.instructions_digest``)."""
        return {node: signed.instructions_digest(self.collected[node]) if node in self.collected else b""
                for node in survivors}

    def unverified_survivors(self, survivors: list[int], instructions: dict[int, bytes]) -> list[int]:
        """The survivors whose signature of ``survivors`` is missing or does not verify with the key their
        member hospital signed their SecAgg+ keys with, against the statement the others signed: every
        site then refuses to unmask (code 9), and only the server can say who stopped the round."""
        view = signed.view_statement(self.run_id, self.group, self.round_keys, self.settings,
                                     self.offers & set(self.round_keys))
        unverified = []
        for node in survivors:
            statement = signed.survivors_statement(self.run_id, self.group, view, survivors, instructions[node])
            key = signed.signer_key(self.keys[node][1]) if node in self.keys else None
            signature = self.survivors.get(node)
            if key is None or signature is None or not signed.verifies(key, signature, statement):
                unverified.append(node)
        return unverified

    @staticmethod
    def _add(message: Message, entries: dict) -> None:
        message.content.config_records[signed.RECORD] = ConfigRecord(entries)


class DropTolerantSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow as this module's docstring describes: a strict-majority threshold per round,
    sites lost before sharing dropped from the sampled set, signed statements relayed, the survivors exchange.

    Args:
        settings: the consortium's ``secure_aggregation`` section.
        timeout: seconds each stage waits for the sites' replies (``federation.round_timeout``).
    """

    def __init__(self, settings: SecureAggregationConfig, timeout: float) -> None:
        super().__init__(num_shares=1.0, reconstruction_threshold=settings.threshold_for(2),
                         max_weight=float(settings.max_weight), clipping_range=settings.clipping_range,
                         quantization_range=settings.quantization_range, modulus_range=2**32, timeout=timeout)
        self.settings = settings
        self.relay = SignatureRelay()

    def round_size(self, sites: int) -> None:
        """Called by the strategy once it has sampled a round's ``sites``: this round's threshold."""
        self.reconstruction_threshold = self.settings.threshold_for(sites)
        if self.reconstruction_threshold < strict_majority(sites):
            log.warning("SECURE AGGREGATION IS WEAKENED: reconstruction threshold %d of %d sites is below a strict "
                        "majority (secure_aggregation.allow_weak_threshold); %d colluding sites and the server could "
                        "unmask one site's reply. Sites that keep their defaults refuse this round.",
                        self.reconstruction_threshold, sites, self.reconstruction_threshold)

    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        state.sampled_node_ids = set(state.active_node_ids)
        return ok

    def share_keys_stage(self, grid, context, state) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        state.sampled_node_ids = set(state.active_node_ids)
        silent = sorted(set(self.relay.round_keys) - self.relay.offers)
        if silent:
            log.warning("round %s: node(s) %s offer no evaluation counts (privacy.release_evaluation: false, or no "
                        "validation slides), so no site releases its own this round: the counts are summed over "
                        "the same sites as the update or not at all; the round's evaluation metrics stay empty",
                        self.relay.group, silent)
        return ok

    def unmask_stage(self, grid, context, state) -> bool:
        """First fedpath's survivors exchange (every survivor signs the one set the server will sum and
        what it trained on; the sites reveal shares only for a set every survivor signed with the plan
        and model they trained on), then Flower's unmasking.
        When no site signed its keys (no site has a roster) nobody would sign or check survivors
        either, and the exchange is skipped: it costs a round trip (seconds with real SuperNodes)."""
        if not self.relay.keys:
            return super().unmask_stage(grid, context, state)
        survivors = sorted(state.active_node_ids)
        request = {signed.STAGE_KEY: signed.SURVIVORS_STAGE, signed.SURVIVORS_KEY: survivors}
        grid.send_and_receive([Message(RecordDict({signed.RECORD: ConfigRecord(request)}), dst_node_id=node,
                                       message_type=MessageType.TRAIN, group_id=self.relay.group)
                               for node in survivors], timeout=self.timeout)
        unmasked = super().unmask_stage(grid, context, state)
        if not unmasked:  # say who stopped it; hashing every site's model is for a failed round only
            self._name_who_stopped(survivors)
        return unmasked

    def _name_who_stopped(self, survivors: list[int]) -> None:
        instructions = self.relay.instructions(survivors)
        if len(set(instructions.values())) > 1:
            log.error("round %s: the sites were sent different plans or models in the collect stage; each site "
                      "refuses to unmask a sum of sites that trained on others (code 9)", self.relay.group)
        elif unverified := self.relay.unverified_survivors(survivors, instructions):
            log.error("round %s: node(s) %s sent no valid signature of the survivors, so every site refuses to "
                      "unmask (code 9); `fedpath-server sites` names the nodes", self.relay.group, unverified)


def fit_workflow(config: ServerConfig) -> DropTolerantSecAggPlus | None:
    """Plain FedAvg messages (None), or SecAgg+ (four exchanges; the server learns only the sum)."""
    secagg = config.secure_aggregation
    if not secagg.enabled:
        return None
    return DropTolerantSecAggPlus(secagg, timeout=config.federation.round_timeout)
