"""The site's Flower ClientApp: finds site.yaml through the SuperNode's node config, then trains
or evaluates the global model it receives (``client/federated_round.py``).

Flower starts a fresh process for every message, so this module imports only Flower and
numpy; torch and Opacus are imported by the stages that train or evaluate.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common.constant import PARTITION_ID_KEY
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

SITE_CONFIG_KEY = "site-config"
"""Node config key with the absolute path of the site's site.yaml (set by `fedpath-site start`)."""
SIMULATION_SITES_KEY = "simulation-sites"
"""Run config key of a simulation (`fedpath-sim run`): the folder of the virtual hospitals' site.yaml files."""
SIMULATED_NODE_ID_FILE = "node-id"

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise


class SiteClient(NumPyClient):
    def __init__(self, site_yaml: Path) -> None:
        self.site_yaml = site_yaml

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        from client import federated_round
        from shared.round_plan import RoundPlan

        reply = federated_round.fit(self._site_config(), RoundPlan.from_config(config), parameters)
        return reply.arrays, reply.examples, reply.metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        from client import federated_round
        from shared.round_plan import RoundPlan

        loss, reply = federated_round.evaluate(self._site_config(), RoundPlan.from_config(config), parameters)
        return loss, reply.examples, reply.metrics

    def _site_config(self):
        from client.site_config import load_site_config

        return load_site_config(self.site_yaml)


def simulated_site_name(partition_id: int) -> str:
    """Flower's Simulation Engine numbers virtual SuperNodes 0..N-1; their sites are site-001..."""
    return f"site-{partition_id + 1:03d}"


def site_yaml_of(context: Context) -> Path:
    value = context.node_config.get(SITE_CONFIG_KEY)
    sites = context.run_config.get(SIMULATION_SITES_KEY)
    if not value and sites and PARTITION_ID_KEY in context.node_config:
        site_dir = Path(str(sites)) / simulated_site_name(int(context.node_config[PARTITION_ID_KEY]))
        # Simulated node ids are random: this file lets the simulation name the site in its reports.
        # Written once per run (every message of the run would write the same id).
        node_file = site_dir / SIMULATED_NODE_ID_FILE
        if not node_file.is_file() or node_file.read_text() != f"{context.node_id}\n":
            node_file.write_text(f"{context.node_id}\n")
        return site_dir / "site.yaml"
    if not value:
        raise ValueError(f"this SuperNode has no '{SITE_CONFIG_KEY}' in its node config: start it with "
                         "`fedpath-site start --config site.yaml`")
    return Path(str(value))


def client_fn(context: Context):
    return SiteClient(site_yaml_of(context)).to_client()


def secure_aggregation(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ for training messages that run the protocol; plain otherwise.

    With SecAgg+ the update is masked here before it leaves; Flower's mod alone would fail
    on a consortium that turned secure aggregation off. The protocol's key-exchange and unmask
    stages never reach ``SiteClient``, so they import neither torch nor Opacus.
    """
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(client_fn=client_fn, mods=[secure_aggregation])
