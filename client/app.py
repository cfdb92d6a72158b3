"""The site's Flower ClientApp: finds site.yaml through the SuperNode's node config, then answers the
server's training messages (``client/federated_round.py``: evaluation rides in the same message).

Two mods stand between Flower and the training code, and they are where the site insists on its
own conditions whatever the server asks (a third, ``travelling_site``, acts only for the virtual
hospitals of a ``data: travel`` simulation: it brings the hospital's files to the Ray node and its
state back):

- ``no_text_leaves`` (outermost): Flower turns an uncaught exception into an error reply whose
  text (paths, slide names, values) goes to the server. Here every failure, SecAgg+ stages and
  configuration errors included, becomes a numeric refusal code with no text; details stay in
  the site's log.
- ``secure_aggregation``: Flower's SecAgg+ for training messages that run the protocol, behind the
  site's own conditions: a plain training message is refused when the site requires SecAgg+; each
  SecAgg+ stage passes ``client/secure_round.py`` first (majority threshold, minimum number of
  sites, full pairing and, with the consortium roster, signed keys, one signed view of the round
  and one signed set of survivors), and the site signs its own statements into the replies.
  Flower's mod takes all of this from the server as given, and a server that cheats could
  otherwise read one site's update (security.md, section 2).

At a deployed site the task runner (``client/task_runner.py``) imports this module once and calls
``app`` for every message; in a simulation Flower's Simulation Engine does. Either way this
module imports only Flower, numpy and cryptography: SecAgg+'s key and unmask stages never need torch or Opacus,
which the stage that trains imports.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
from flwr.app import Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.client import ClientApp, NumPyClient
from flwr.common.constant import PARTITION_ID_KEY
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.secure_round import (
    SiteSigner,
    UnsafeRound,
    is_survivors_request,
    may_release_evaluation,
    secure_stage,
    training_for_a_masked_sum,
)
from shared.cli import LOG_DATEFMT, LOG_FORMAT
from shared.errors import UserError
from shared.refusals import REFUSAL_ERROR_BASE, UNDISCLOSED_SIT_OUT, InvalidFederationId, refusal_text
from shared.server_labels import exception_text, log_text, server_label

SITE_CONFIG_KEY = "site-config"
"""Node config key with the absolute path of the site's site.yaml (set by `fedpath-site start`)."""
SIMULATION_SITES_KEY = "simulation-sites"
"""Run config key of a simulation (`fedpath-sim run`): the folder of the virtual hospitals' site.yaml files."""
SIMULATED_NODE_ID_FILE = "node-id"
SIMULATION_TRAVEL_KEY = "simulation-travel"
"""Run config key of a ``data: travel`` simulation: the Ray namespace holding its virtual hospitals."""

logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt=LOG_DATEFMT)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
log = logging.getLogger("fedpath.site")


class SiteRefusal(Exception):
    """The site refuses this message; only ``code`` (``shared.refusals.REFUSALS``) leaves the site."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(f"{refusal_text(code)}{f': {detail}' if detail else ''}")
        self.code = code


class SiteClient(NumPyClient):
    def __init__(self, site_yaml: Path, simulated_site: int | None = None) -> None:
        self.site_yaml, self.simulated_site = site_yaml, simulated_site

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        from client import federated_round
        from shared.round_plan import RoundPlan

        try:
            plan = RoundPlan.from_config(config)
        except InvalidFederationId as exc:  # checked before anything at the site is touched
            raise SiteRefusal(10, str(exc)) from None
        config = site_config(self.site_yaml)
        masked = training_for_a_masked_sum()
        reply = federated_round.fit(config, plan, parameters, noise_seed=self._noise_seed(plan),
                                    masked_evaluation=may_release_evaluation() if masked else None)
        if reply.refused is not None and masked:
            # Not a masked vector of zeros: it would count this site among the summed (secure_round.py).
            # The reason leaves only if the hospital discloses it, as in a plain round's `refused`.
            code = reply.refused if "refused" in config.disclose else UNDISCLOSED_SIT_OUT
            raise SiteRefusal(code, f"sits this SecAgg+ round out (code {reply.refused}): answers with code {code}, "
                                    "not a masked vector")
        return reply.arrays, reply.examples, reply.metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        # Evaluation rides in the training message, inside the masked sum; a separate evaluate
        # message would send per-site metrics in plain form.
        raise SiteRefusal(13, "fedpath sites answer no separate evaluate messages")

    def _noise_seed(self, plan) -> int | None:
        """Reproducible DP noise only for a virtual site of a simulation that asked for it."""
        if self.simulated_site is None or not plan.reproducible_noise:
            return None
        return zlib.crc32(f"{plan.seed}:{plan.round}:{self.simulated_site}".encode())


def site_config(site_yaml: Path):
    from client.site_config import load_site_config

    return load_site_config(site_yaml)


def offers_evaluation(config) -> bool:
    """Whether this site can release evaluation counts in a SecAgg+ round it is setting up: it allows it
    (``privacy.release_evaluation``) and its feature cache holds validation slides."""
    if not config.privacy.release_evaluation:
        return False
    from client.feature_cache import CacheError, FeatureCache  # the setup stage only, never torch

    try:
        index = FeatureCache(config.features.cache_dir).read_index()
        return any(item.get("split") == "val" for item in index.items.values())
    except (CacheError, OSError, AttributeError, TypeError) as exc:  # training refuses it with its reason (code 5)
        log.warning("no evaluation counts offered: the feature cache cannot be read (%s)", exc)
        return False


def simulated_site_name(partition_id: int) -> str:
    """Flower's Simulation Engine numbers virtual SuperNodes 0..N-1; their sites are site-001..."""
    return f"site-{partition_id + 1:03d}"


def simulated_site(context: Context) -> int | None:
    """The partition id of a virtual site of `fedpath-sim run`; None for a deployed SuperNode (whose node
    config, set by the hospital, names its site.yaml and has no partition id)."""
    if context.node_config.get(SITE_CONFIG_KEY) or not context.run_config.get(SIMULATION_SITES_KEY):
        return None
    return int(context.node_config[PARTITION_ID_KEY]) if PARTITION_ID_KEY in context.node_config else None


def site_yaml_of(context: Context) -> Path:
    value = context.node_config.get(SITE_CONFIG_KEY)
    partition = simulated_site(context)
    if partition is not None:
        site_dir = Path(str(context.run_config[SIMULATION_SITES_KEY])) / simulated_site_name(partition)
        if travel := context.run_config.get(SIMULATION_TRAVEL_KEY):  # this node's copy (travelling_site)
            from simulations.site_travel import local_site_yaml

            site_dir = local_site_yaml(str(travel), simulated_site_name(partition)).parent
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
    return SiteClient(site_yaml_of(context), simulated_site(context)).to_client()


def no_text_leaves(msg: Message, context: Context, call_next) -> Message:
    """Outermost mod: any failure below becomes ``Error(REFUSAL_ERROR_BASE + code)`` without a reason."""
    try:
        reply = call_next(msg, context)
    except SiteRefusal as refusal:
        log.warning("refused a %s message of run %s: %s", server_label(msg.metadata.message_type), msg.metadata.run_id,
                    log_text(str(refusal)))  # a refusal may quote what the server sent
        return Message(Error(code=REFUSAL_ERROR_BASE + refusal.code), reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - nothing may leave as text; the site's log keeps the traceback
        # The frames are the site's own code; the messages (its own, its causes') may carry what the server
        # sent: escaped and cut.
        log.error("could not handle a %s message of run %s: %s", server_label(msg.metadata.message_type),
                  msg.metadata.run_id, exception_text(exc))
        return Message(Error(code=REFUSAL_ERROR_BASE + 13), reply_to=msg)
    if reply.has_error() and reply.error.reason:
        log.warning("an error reply carried text; sent without it: %s", log_text(reply.error.reason))
        return Message(Error(code=reply.error.code), reply_to=msg)
    return reply


def travelling_site(msg: Message, context: Context, call_next) -> Message:
    """A virtual hospital of a ``data: travel`` simulation: checked out onto this node before the message
    and its state checked back in after it, also after a failure (``simulations/site_travel.py``)."""
    partition, travel = simulated_site(context), context.run_config.get(SIMULATION_TRAVEL_KEY)
    if partition is None or not travel:
        return call_next(msg, context)
    from simulations.site_travel import check_in, check_out

    site = simulated_site_name(partition)
    log.info("%s: %s message on a copy checked out at %s", site, msg.metadata.message_type,
             check_out(str(travel), site).parent)
    try:
        return call_next(msg, context)
    finally:
        check_in(str(travel), site, context.node_id)


def secure_aggregation(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ for training messages that run the protocol (its key-exchange and unmask stages
    never reach ``SiteClient``, so they import neither torch nor Opacus), behind the site's own
    conditions, checked before Flower's mod acts."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    config = site_config(site_yaml_of(context))
    if RECORD_KEY_CONFIGS not in msg.content.config_records and not is_survivors_request(msg):
        if config.federation.require_secure_aggregation:
            raise SiteRefusal(8, "a plain training message; set federation.require_secure_aggregation: false "
                                 "in site.yaml to accept unmasked rounds")
        return call_next(msg, context)
    try:
        signer = SiteSigner.for_site(config.federation.roster, config.federation.auth_key)
    except (UnsafeRound, UserError) as exc:  # an unusable roster or key: no round without the checks it asks for
        raise SiteRefusal(9, str(exc)) from None
    try:
        return secure_stage(msg, context, call_next, config.federation.min_round_sites, signer,
                            collects=config.state_dir / "secagg", offers_evaluation=lambda: offers_evaluation(config))
    except UnsafeRound as exc:  # (failures of the training below keep their own codes)
        raise SiteRefusal(9, str(exc)) from None


app = ClientApp(client_fn=client_fn, mods=[no_text_leaves, travelling_site, secure_aggregation])
