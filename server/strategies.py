"""The aggregation rule, chosen in server.yaml: Flower's own strategies, unchanged.

Sites send updates (new minus received parameters); every rule here is applied to the
updates and the result added to the global model. For FedAvg (weights sum to one), the
coordinate-wise median, the trimmed mean and Krum this equals applying the rule to the
new parameters themselves.
"""

from __future__ import annotations

from flwr.server.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum, Strategy

from server.server_config import ServerConfig


def build_strategy(config: ServerConfig) -> Strategy:
    """Flower's strategy for ``strategy.name`` in server.yaml, with the federation's sampling.

    Args:
        config: the server's config. ``federation.fraction`` of the sites train each round, at
            least ``federation.min_sites`` of them, and every site evaluates; ``strategy`` names the
            rule (``fedavg``, ``fedprox`` with ``proximal_mu``, ``median``, ``trimmed_mean`` with
            ``trim_beta``, ``krum`` with ``krum_malicious`` and ``krum_keep``).

    Returns a ``flwr.server.strategy`` strategy (the legacy stack SecAgg+ needs) whose metrics
    aggregation is empty: fedpath aggregates the sites' metrics itself (``server/round_metrics.py``).
    """
    federation, strategy = config.federation, config.strategy
    common = dict(fraction_fit=federation.fraction, fraction_evaluate=1.0, min_fit_clients=federation.min_sites,
                  min_evaluate_clients=1, min_available_clients=federation.min_sites,
                  # fedpath aggregates the sites' metrics itself (server/round_metrics.py)
                  fit_metrics_aggregation_fn=_no_metrics, evaluate_metrics_aggregation_fn=_no_metrics)
    if strategy.name == "fedavg":
        return FedAvg(**common)
    if strategy.name == "fedprox":
        return FedProx(**common, proximal_mu=strategy.proximal_mu)
    if strategy.name == "median":
        return FedMedian(**common)
    if strategy.name == "trimmed_mean":
        return FedTrimmedAvg(**common, beta=strategy.trim_beta)
    return Krum(**common, num_malicious_clients=strategy.krum_malicious, num_clients_to_keep=strategy.krum_keep)


def _no_metrics(_: list) -> dict:
    return {}
