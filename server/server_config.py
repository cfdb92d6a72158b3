"""The consortium's `server.yaml`: where the SuperLink listens, how rounds run, what is trained.

Everything is validated before a process starts, with errors that name the key and line;
combinations that cannot work (Krum with too few sites, a positive class that is not a class)
are refused here rather than failing in round 3.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from shared.encoder import WeightsError, check_pinned
from shared.model import ModelConfig
from shared.refusals import strict_majority
from shared.round_plan import (
    BATCH_SIZE,
    EPOCHS,
    PROXIMAL_MU,
    SEQUENCE_LENGTH,
    WEIGHT_SCALE,
    PrivacyTarget,
    evaluation_bins_rule,
)
from shared.yaml_config import (
    ConfigError,
    SettingError,
    at_least,
    between,
    check,
    folder_rule,
    load_config,
    positive,
    tcp_port,
)

StrategyName = Literal["fedavg", "fedprox", "median", "trimmed_mean", "krum"]


LOOPBACK = "127.0.0.1"


def host_rule(host: str) -> str | None:
    """An IP address or a host name (it goes into nginx's ``listen``): nothing that could end the directive."""
    if host == "":
        return None
    if "%" in host:
        return "must not name an IPv6 zone (%): nginx listens on an address"
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    label = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    if re.fullmatch(rf"(?=.{{1,253}}$){label}(\.{label})*", host):
        return None
    return "must be an IP address or a host name"


@dataclass(frozen=True)
class SuperLinkConfig:
    """Where the consortium server listens. Two ports: the sites' port (``host:port``) is the
    proxy, which passes only the Fleet API; the SuperLink itself, with its unauthenticated Control
    and Runtime APIs, listens on ``127.0.0.1:loopback_port`` and is reached from this host only."""

    host: str = check(host_rule, LOOPBACK)  # interface of the sites' port; 0.0.0.0 for hospitals on other machines
    port: int = check(tcp_port, 9092)  # the sites' port: the proxy, Fleet API only
    loopback_port: int | None = check(tcp_port, None)  # the SuperLink on 127.0.0.1 (admin commands); default port + 1
    public_address: str | None = None  # host:port `add-site` tells hospitals to connect to; default host:port
    max_request_mb: int = check(lambda m: None if 1 <= m <= 2048 else "must be in 1-2048", 64)  # largest request body
    # How long the proxy holds a site's pull while there is no message for it (server/pull_relay.py), so
    # the next round reaches the site at once instead of after Flower's 3 s SuperNode sleep; 0: no relay.
    # At most 20: a SuperNode gives up on a request after 30 s.
    pull_hold_s: float = check(lambda s: None if 0 <= s <= 20 else "must be in 0-20 (seconds)", 20.0)
    # state.db, logs, pid files, the proxy's files; default state/ beside server.yaml
    state_dir: Path | None = check(folder_rule, None)
    certs_dir: Path | None = None  # ca.pem, server.pem, server.key from `fedpath-server init`; default certs/

    def __post_init__(self) -> None:
        if self.loopback_port is None and self.port == 65535:
            raise SettingError("loopback_port", "port 65535 leaves no default (port + 1): set superlink.loopback_port")
        if self.loopback == self.port:
            raise SettingError("loopback_port", f"must differ from superlink.port ({self.port}): the sites' port is "
                                                "the proxy, the loopback port the SuperLink behind it")

    @property
    def address(self) -> str:
        """The sites' port, as it is bound."""
        return f"{self.host}:{self.port}"

    @property
    def loopback(self) -> int:
        return self.port + 1 if self.loopback_port is None else self.loopback_port

    @property
    def loopback_address(self) -> str:
        """The SuperLink itself: the admin commands' (and the proxy's) only way in."""
        return f"{LOOPBACK}:{self.loopback}"


@dataclass(frozen=True)
class ServerOptimizerConfig:
    """The server's step on the aggregated update (server/server_optimizer.py): none (FedAvg), momentum
    (FedAvgM) or adam (FedAdam)."""

    name: Literal["none", "momentum", "adam"] = "none"
    learning_rate: float = check(positive, 1.0)  # server step size (1.0 with momentum 0: plain FedAvg)
    momentum: float = check(lambda b: None if 0 <= b < 1 else "must be in [0, 1)", 0.9)  # momentum; Adam's beta1
    beta2: float = check(lambda b: None if 0 <= b < 1 else "must be in [0, 1)", 0.99)  # adam only
    tau: float = check(positive, 1e-3)  # adam only: its epsilon, how far it trusts small second moments


@dataclass(frozen=True)
class StrategyConfig:
    name: StrategyName = "fedavg"  # fedavg weights sites by their number of patients
    server_optimizer: ServerOptimizerConfig = field(default_factory=ServerOptimizerConfig)
    proximal_mu: float = check(PROXIMAL_MU, 0.01)  # fedprox: pull towards the global model
    trim_beta: float = check(lambda b: None if 0 <= b < 0.5 else "must be in [0, 0.5)", 0.2)  # trimmed_mean
    krum_malicious: int = check(at_least(0), 0)  # krum: sites assumed to be malicious
    krum_keep: int = check(at_least(0), 0)  # krum: average the best k (0: pick one, plain Krum)


def _threshold_rule(value) -> str | None:
    if value == "majority" or (isinstance(value, int) and value >= 1):
        return None
    return "must be 'majority' or a number of sites >= 1"


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Flower's SecAgg+: the server sees only the masked sum of the sites' replies."""

    enabled: bool = True
    # Sites whose shares are needed to unmask: a strict majority of the round's sites (n // 2 + 1, computed
    # every round) unless a larger number is given. A smaller number lets fewer colluding sites (with the
    # server) unmask one site's reply; it is refused unless allow_weak_threshold, and sites refuse it anyway.
    reconstruction_threshold: int | Literal["majority"] = check(_threshold_rule, "majority")
    allow_weak_threshold: bool = False  # accept a reconstruction_threshold below a strict majority (logged loudly)
    clipping_range: float = check(positive, 1.0)  # |update value| allowed; sites refuse rather than be clipped
    quantization_range: int = check(lambda q: None if 1024 <= q <= 2**26 else "must be in [1024, 2**26]", 2**26)
    max_weight: int = check(WEIGHT_SCALE, 1000)  # most patients one site may train on (precision depends on it)

    def threshold_for(self, sites: int) -> int:
        """The reconstruction threshold of a round with ``sites`` sampled sites."""
        majority = strict_majority(sites)
        if self.reconstruction_threshold == "majority":
            return majority
        return self.reconstruction_threshold if self.allow_weak_threshold else max(self.reconstruction_threshold,
                                                                                     majority)


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = check(between(1, 99_000), 5)  # plus spare_rounds: within the plan's ROUNDS
    min_sites: int = check(at_least(1), 2)  # a round fails when fewer sites send an update
    fraction: float = check(lambda f: None if 0 < f <= 1 else "must be in (0, 1]", 1.0)  # sites sampled per round
    round_timeout: float = check(positive, 600.0)  # seconds to wait for the sites' replies in each phase
    # Seconds a round waits, once min_sites are online, for the sites of the round before that are not (yet):
    # after a server restart, a SuperNode's heartbeat retry comes up to 20 s after the SuperLink is back,
    # and a round that starts without a site may be refused by the others (min_round_sites). 0: no wait.
    rejoin_wait: float = check(at_least(0), 30.0)
    best_metric: Literal["auc", "accuracy", "balanced_accuracy"] = "auc"  # which checkpoint is `best`
    max_update_norm: float = check(positive, 10.0)  # L2 norm bound of one site's update, checked at both ends
    wire_log: bool = False  # write wire.jsonl: the structure of every reply the sites sent (audits, tests)
    # Sites score the model they receive every this many rounds (and the final model always); each
    # evaluation is a private release charged to every site's ledger.
    evaluate_every: int = check(at_least(1), 1)
    evaluation_bins: int = check(evaluation_bins_rule, 10)
    # Rounds of every site's privacy budget kept for rounds redone after a server crash. A redone round trains
    # and scores again, so it spends again; a site whose budget was planned for exactly `rounds` refuses it
    # (and every later round). Each spare round raises the noise as one more planned round does.
    spare_rounds: int = check(between(0, 1_000), 0)


@dataclass(frozen=True)
class LocalTraining:
    """What every site does with the global model in one round."""

    epochs: int = check(EPOCHS, 1)
    batch_size: int = check(BATCH_SIZE, 16)  # expected patients per DP-SGD step
    learning_rate: float = check(positive, 1e-3)
    sequence_length: int = check(SEQUENCE_LENGTH, 8)
    seed: int = 0  # initial global model and the sites' sampling


@dataclass(frozen=True)
class ServerConfig:
    classes: tuple[str, ...]  # class names in model order, the same at every site
    name: str = "fedpath consortium"
    positive_class: str | None = None  # binary: sensitivity/specificity/AUC of this class (default: the second)
    superlink: SuperLinkConfig = field(default_factory=SuperLinkConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: LocalTraining = field(default_factory=LocalTraining)
    privacy: PrivacyTarget = field(default_factory=PrivacyTarget)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    results_dir: Path | None = check(folder_rule, None)  # one folder per run; default runs/ beside server.yaml
    # The pinned trunk at the server (model.trainable: last_block starts the global block from it):
    # "random" or a .pth whose sha256 is model.trunk_sha256
    trunk_weights: str = "random"

    def __post_init__(self) -> None:
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise SettingError("classes", f"need at least two distinct class names, got {list(self.classes)}")
        if self.positive_class is not None and self.positive_class not in self.classes:
            raise SettingError("positive_class", f"'{self.positive_class}' is not one of classes {list(self.classes)}")
        if self.model.trainable == "last_block" and self.model.trunk_sha256 is None:
            raise SettingError("model.trainable", "last_block needs model.trunk_sha256: the sites' cached block "
                                                  "inputs and the global block must come from one trunk")
        if self.model.frozen_projection and self.model.trunk_sha256 is None:
            raise SettingError("model.frozen_projection", "needs model.trunk_sha256: every site reads the projection "
                                                          "from its trunk file, and only a pinned file makes it the "
                                                          "same projection everywhere")
        strategy, secagg = self.strategy, self.secure_aggregation
        if secagg.enabled and strategy.name in ("median", "trimmed_mean", "krum"):
            raise SettingError("strategy.name", f"{strategy.name} needs every site's update, but secure_aggregation "
                                                "shows the server only their sum: use fedavg/fedprox, or set "
                                                "secure_aggregation.enabled: false")
        if secagg.enabled and self.federation.min_sites < 2:
            raise SettingError("federation.min_sites", "must be at least 2 with secure_aggregation (a sum of one "
                                                       "site's reply is that reply)")
        threshold = secagg.reconstruction_threshold
        if secagg.enabled and threshold != "majority":
            if threshold < strict_majority(self.federation.min_sites) and not secagg.allow_weak_threshold:
                raise SettingError(
                    "secure_aggregation.reconstruction_threshold",
                    f"{threshold} is below a strict majority of federation.min_sites ({self.federation.min_sites}): "
                    "fewer colluding sites could unmask one site's reply. Use 'majority' (the default); sites refuse "
                    "weaker rounds anyway. allow_weak_threshold: true overrides this check (logged every round)")
            if self.federation.min_sites < threshold:
                raise SettingError("federation.min_sites",
                                   f"{self.federation.min_sites} is below secure_aggregation.reconstruction_threshold "
                                   f"({threshold}): a round with that few sites could never unmask its sum")
        if secagg.enabled and secagg.clipping_range < self.federation.max_update_norm / 1e3:
            raise SettingError("secure_aggregation.clipping_range", "so small that most updates allowed by "
                                                                    "federation.max_update_norm would be refused")
        if strategy.name == "krum" and self.federation.min_sites < 2 * strategy.krum_malicious + 3:
            raise SettingError("federation.min_sites",
                               f"must be >= {2 * strategy.krum_malicious + 3} for strategy krum with krum_malicious="
                               f"{strategy.krum_malicious} (Krum scores each update against n - f - 2 others)")

    def as_dict(self) -> dict:
        return asdict(self)


def load_server_config(path: str | Path) -> ServerConfig:
    """Load and validate server.yaml; relative paths are taken from its folder."""
    config = load_config(ServerConfig, path)
    base = Path(path).resolve().parent
    superlink = replace(config.superlink, state_dir=config.superlink.state_dir or base / "state",
                        certs_dir=config.superlink.certs_dir or base / "certs")
    trunk = config.trunk_weights
    if trunk not in ("random", "imagenet"):
        trunk = str((base / Path(trunk).expanduser()).resolve())
    if config.model.trainable == "last_block":
        try:
            check_pinned(trunk, config.model.trunk_sha256)
        except WeightsError as exc:
            raise ConfigError(f"{path}: trunk_weights: {exc}") from None
    return replace(config, superlink=superlink, results_dir=config.results_dir or base / "runs", trunk_weights=trunk)
