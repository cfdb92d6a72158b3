"""Flower's SecAgg+ workflow, made to survive a site that is already gone when a round starts.

Flower 1.42 keeps every sampled node in ``sampled_node_ids`` even when it never answered the
setup (or key-sharing) stage, and at unmasking tries to rebuild that node's mask secret from
shares nobody ever received: "Not enough shares to recover secret", and the round halts. A site
that died between rounds is still listed online until its heartbeat expires, so it is sampled.
Such a node never exchanged keys or shares, so no other site's mask involves it: dropping it from
the sampled set after those stages is exactly the protocol's own handling of a site that was
never sampled. Nodes that drop later (after sharing) are still recovered by Flower as before.
"""

from __future__ import annotations

from flwr.server.workflow import SecAggPlusWorkflow

from server.server_config import ServerConfig


class DropTolerantSecAggPlus(SecAggPlusWorkflow):
    def setup_stage(self, grid, context, state) -> bool:
        ok = super().setup_stage(grid, context, state)
        state.sampled_node_ids = set(state.active_node_ids)
        return ok

    def share_keys_stage(self, grid, context, state) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        state.sampled_node_ids = set(state.active_node_ids)
        return ok


def fit_workflow(config: ServerConfig) -> SecAggPlusWorkflow | None:
    """Plain FedAvg messages (None), or SecAgg+ (four exchanges; the server learns only the sum)."""
    secagg = config.secure_aggregation
    if not secagg.enabled:
        return None
    return DropTolerantSecAggPlus(num_shares=1.0, reconstruction_threshold=secagg.reconstruction_threshold,
                                  max_weight=float(secagg.max_weight), clipping_range=secagg.clipping_range,
                                  quantization_range=secagg.quantization_range, modulus_range=2**32,
                                  timeout=config.federation.round_timeout)
