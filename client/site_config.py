"""A hospital's `site.yaml`: where its slides are, how to tile them, where the feature cache lives."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from shared.app_bundle import digest_problem
from shared.model_config import INCEPTION, ModelConfig, backbone_rule, batch_size_rule, device_rule
from shared.run_config import DISCLOSABLE, PrivacyConfig, TrainingConfig
from shared.site_keys import site_name_problem
from shared.yaml_config import (
    ConfigError,
    SettingError,
    at_least,
    between,
    check,
    folder_rule,
    fraction,
    load_config,
    positive,
    tcp_port,
)


@dataclass(frozen=True)
class DataConfig:
    """Where the site's labelled data is: a slide manifest or a folder of labelled tiles."""

    manifest: Path | None = None  # CSV with columns slide, label[, patient][, split]
    tile_folder: Path | None = None  # one sub-folder per class, image tiles inside
    labels: tuple[str, ...] = ()  # allowed class names in model order; empty: sorted labels found
    val_fraction: float = check(fraction, 0.2)  # patients held out when the manifest has no split
    split_seed: int = 0
    group_size: int = check(at_least(1), 1)  # tile folders: tiles of one class grouped into one item
    mpp_override: float | None = check(positive, None)  # µm/px for slides that record neither mpp nor objective

    def __post_init__(self) -> None:
        if (self.manifest is None) == (self.tile_folder is None):
            raise ValueError("set exactly one of 'manifest' (slides) or 'tile_folder' (tiles)")
        if len(set(self.labels)) != len(self.labels):
            raise SettingError("labels", "class names must be unique")


@dataclass(frozen=True)
class TilingConfig:
    # µm per pixel of the tiles (0.5 is about 20x); no scanner resolves below 0.1, so 0.05 already upsamples
    target_mpp: float = check(between(0.05, 100.0), 0.5)
    tile_size: int = check(at_least(75), 299)  # pixels; 299 is InceptionV3's native input
    min_tissue: float = check(fraction, 0.5)  # keep tiles with at least this tissue fraction
    mask_size: int = check(at_least(64), 2048)  # upper bound on the tissue mask's longest side (pixels)


@dataclass(frozen=True)
class FeatureConfig:
    # The trunk: inception_v3 (the default), or timm:NAME, a tile encoder of the timm package with a local
    # weights file (shared/timm_encoder.py); it sets model.backbone, what the federation's model reads.
    backbone: str = check(backbone_rule, INCEPTION)
    backbone_weights: str = "random"  # "random", "imagenet" (InceptionV3), or a path to a .pth state dict
    cache_dir: Path | None = check(folder_rule, None)  # default: cache/ beside site.yaml
    # Where the trunk runs and the model trains: auto (the first CUDA GPU, else Apple MPS, else the CPU),
    # cpu, cuda, cuda:N or mps. Vectors do not depend on it beyond rounding (docs/performance.md).
    device: str = check(device_rule, "auto")
    # Tiles per trunk batch; auto: 16 on a CPU, what the free memory holds on a GPU (halved on out-of-memory).
    batch_size: int | Literal["auto"] = check(batch_size_rule, "auto")
    num_workers: int = check(at_least(0), 1)  # tile-reading processes next to the feature extractor
    # torch threads of prepare, predict and training (the task runner, train-local); 0: torch's default, one
    # per core. Processes sharing the machine must share its cores (shared/devices.py: use_threads).
    threads: int = check(at_least(0), 0)


@dataclass(frozen=True)
class SequenceConfig:
    length: int = check(at_least(1), 8)  # tiles per sequence fed to the recurrent head


def key_file_rule(path: Path) -> str | None:
    """`fedpath-site keygen` writes the private key where ``auth_key`` says and the public one beside it
    (``<name>.pub``): any other name made it write where `start` never looks."""
    return None if path.suffix == ".key" and site_name_problem(path.stem) is None else \
        "must name a <site>.key file (1-64 letters, digits, '-' or '_' before .key): keygen writes it and <site>.pub"


@dataclass(frozen=True)
class FederationSite:
    """How this site's SuperNode reaches the consortium's server."""

    server: str | None = None  # host:port of the SuperLink, from the consortium admin
    ca_cert: Path | None = None  # the consortium's ca.pem (TLS); required unless started with --insecure
    port: int = check(tcp_port, 9094)  # local
    # this site's private key; default: state/keys/<name>.key (`fedpath-site keygen` writes it and <name>.pub)
    auth_key: Path | None = check(key_file_rule, None)
    # The site's own conditions for taking part, whatever the server asks:
    require_secure_aggregation: bool = True  # refuse plain (unmasked) training messages (refusal 8)
    min_round_sites: int = check(at_least(2), 3)  # refuse a SecAgg+ round with fewer sites (refusal 9)
    # The consortium's member hospitals' public keys (one `<site>.pub` line each), checked by this site's
    # data-protection officer against the consortium agreement. With it, every SecAgg+ round's keys, list
    # of sites and survivors must be signed by members (shared/signed_secagg.py); without it the other
    # sites' keys are taken on the server's word.
    roster: Path | None = None
    # sha256 content digests of app bundles this site accepts besides its own installed fedpath version
    # (`fedpath-site bundle-digest`); a run with any other bundle is refused (refusal 12)
    allowed_bundles: tuple[str, ...] = check(lambda digests: _first_problem(digests, digest_problem), ())
    # Keep a copy of every reply vector this site sent (before SecAgg+ masks it) in state/sent/<federation>/,
    # for the hospital's own audits: the masked sum the server read can be checked against them.
    keep_sent_replies: bool = False


@dataclass(frozen=True)
class SiteConfig:
    name: str = check(site_name_problem)  # names its key files, its registry entry, its logs
    data: DataConfig
    tiling: TilingConfig = field(default_factory=TilingConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    sequences: SequenceConfig = field(default_factory=SequenceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    federation: FederationSite = field(default_factory=FederationSite)
    # privacy ledgers, egress log, SuperNode log and pid file; default: state/ beside site.yaml
    state_dir: Path | None = check(folder_rule, None)
    # The only per-site values that leave in plain form (everything else travels inside the masked sum
    # or stays here): see DISCLOSABLE.
    disclose: tuple[str, ...] = ("epsilon", "refused")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.disclose) - set(DISCLOSABLE))
        if unknown:
            raise SettingError("disclose", f"{unknown} cannot be disclosed; choose from {list(DISCLOSABLE)}")


def _first_problem(values, rule) -> str | None:
    return next((f"item {i + 1}: {problem}" for i, value in enumerate(values) if (problem := rule(value))), None)


def load_site_config(path: str | Path) -> SiteConfig:
    """Load and validate a site config; relative paths are taken from the config's folder."""
    config = load_config(SiteConfig, path)
    base = Path(path).resolve().parent
    weights = config.features.backbone_weights
    if weights not in BUILTIN_WEIGHTS:
        weights = str((base / Path(weights).expanduser()).resolve())
    features = replace(config.features, backbone_weights=weights,
                       cache_dir=config.features.cache_dir or base / "cache")
    training = replace(config.training, out_dir=config.training.out_dir or base / "runs" / "local")
    state_dir = config.state_dir or base / "state"
    federation = replace(config.federation,
                         auth_key=config.federation.auth_key or state_dir / "keys" / f"{config.name}.key")
    if config.model.backbone not in (INCEPTION, config.features.backbone):
        raise ConfigError(f"{path}: model.backbone {config.model.backbone} differs from features.backbone "
                          f"{config.features.backbone}; set features.backbone only (the model follows it)")
    try:  # the model reads the vectors of this site's trunk (its size, and what it may do with them)
        model = replace(config.model, backbone=config.features.backbone)
    except ValueError as exc:
        raise ConfigError(f"{path}: features.backbone: {exc}") from None
    return replace(config, features=features, training=training, state_dir=state_dir, federation=federation,
                   model=model)


BUILTIN_WEIGHTS = ("random", "imagenet")
