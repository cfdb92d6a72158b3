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
"""

from __future__ import annotations

import logging

from flwr.server.workflow import SecAggPlusWorkflow

from server.server_config import SecureAggregationConfig, ServerConfig

log = logging.getLogger("fedpath.server")


class DropTolerantSecAggPlus(SecAggPlusWorkflow):
    def __init__(self, settings: SecureAggregationConfig, timeout: float) -> None:
        super().__init__(num_shares=1.0, reconstruction_threshold=settings.threshold_for(2),
                         max_weight=float(settings.max_weight), clipping_range=settings.clipping_range,
                         quantization_range=settings.quantization_range, modulus_range=2**32, timeout=timeout)
        self.settings = settings

    def round_size(self, sites: int) -> None:
        """Called by the strategy once it has sampled a round's ``sites``: this round's threshold."""
        self.reconstruction_threshold = self.settings.threshold_for(sites)
        if self.reconstruction_threshold < sites // 2 + 1:
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
        return ok


def fit_workflow(config: ServerConfig) -> DropTolerantSecAggPlus | None:
    """Plain FedAvg messages (None), or SecAgg+ (four exchanges; the server learns only the sum)."""
    secagg = config.secure_aggregation
    if not secagg.enabled:
        return None
    return DropTolerantSecAggPlus(secagg, timeout=config.federation.round_timeout)
