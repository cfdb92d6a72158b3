"""A researcher's `sim.yaml`: the consortium's server settings plus how to simulate its hospitals.

The server-side sections (``federation``, ``strategy``, ``model``, ``training``, ``privacy``,
``secure_aggregation``, ``classes``/``positive_class``) are the very dataclasses of
``server.yaml`` (``server/server_config.py``), validated by the same rules; ``simulation:`` says
where the data comes from, how it is split into virtual hospitals and what differs between them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from client.site_config import BUILTIN_WEIGHTS, FeatureConfig, TilingConfig
from server.server_config import FederationConfig, LocalTraining, SecureAggregationConfig, ServerConfig, StrategyConfig
from shared.model import ModelConfig
from shared.round_plan import PrivacyTarget
from shared.yaml_config import SettingError, at_least, check, fraction, load_config, parse_config, positive


@dataclass(frozen=True)
class GeneratedData:
    """Synthetic pyramidal slides (``simulations/slide_generator.py``), made once per setting."""

    slides: int = check(at_least(2), 40)
    size: int = check(at_least(256), 1024)  # level-0 side in pixels, ±25 % per slide
    cancer_fraction: float = check(fraction, 0.5)  # share of adenocarcinoma slides in the pool


@dataclass(frozen=True)
class ClassSource:
    name: str  # a model class
    labels: tuple[str, ...]  # the manifest labels or tile folders that make it up (adenoma: [T, V])


@dataclass(frozen=True)
class DataSource:
    source: Literal["generated", "tiles", "manifest"] = "generated"
    generated: GeneratedData = field(default_factory=GeneratedData)
    tile_folder: Path | None = None  # tiles: one sub-folder per class folder (e.g. crc-tiles: AC H S T V)
    manifest: Path | None = None  # manifest: CSV slide,label[,patient] of real slides (split column ignored)
    class_map: tuple[ClassSource, ...] = ()  # empty: each class is the label/folder of its own name
    group_size: int = check(at_least(1), 8)  # tiles: tiles of one class grouped into one item (one "patient")
    items_per_class: int | None = check(at_least(1), None)  # cap per model class (quick studies); None: all
    mpp_override: float | None = check(positive, None)  # manifest: µm/px of slides that record none

    def __post_init__(self) -> None:
        if self.source == "tiles" and self.tile_folder is None:
            raise ValueError("simulation.data: source 'tiles' needs 'tile_folder'")
        if self.source == "manifest" and self.manifest is None:
            raise ValueError("simulation.data: source 'manifest' needs 'manifest'")


@dataclass(frozen=True)
class PartitionConfig:
    """How patients are dealt to the virtual hospitals (``simulations/partitioners.py``)."""

    scheme: Literal["iid", "dirichlet", "quantity"] = "iid"
    alpha: float = check(positive, 0.5)  # dirichlet: label skew, small = each site sees mostly one class
    beta: float = check(positive, 1.0)  # quantity: Dirichlet(β) share of patients per site, small = unequal


@dataclass(frozen=True)
class StainShiftConfig:
    """A per-site colour transform in haematoxylin-eosin space (``simulations/stain_shift.py``)."""

    strength: float = check(lambda s: None if 0 <= s <= 1 else "must be between 0 and 1", 0.0)  # 0: off


@dataclass(frozen=True)
class SitePrivacy:
    """What every virtual hospital's site.yaml says about DP; ε and δ are the consortium's (``privacy:``)."""

    enabled: bool = True
    accountant: Literal["rdp", "prv"] = "rdp"
    max_grad_norm: float = check(positive, 1.0)
    # Sites score the models they receive and release noisy counts (part of ε, privacy.evaluation_share).
    # Experiments score checkpoints on the held-out test set instead and turn this off, so the federated
    # arms spend their whole budget on training, like the baselines.
    release_evaluation: bool = True


def ray_address(value: str) -> str | None:
    if value in ("", "auto") or re.fullmatch(r"(ray://)?[A-Za-z0-9.\-]+:[0-9]{1,5}", value):
        return None
    return "must be auto, ray://HOST:PORT (Ray Client) or HOST:PORT (a Ray head's address)"


@dataclass(frozen=True)
class BackendConfig:
    """Flower's Simulation Engine (Ray): where the virtual hospitals run and how many at once."""

    cpus_per_site: int = check(at_least(1), 1)  # Ray runs cpus / cpus_per_site ClientApps at a time
    cpus: int = check(at_least(0), 0)  # cores of the Ray started for the run; 0: all of this machine's
    # Empty: a Ray of the run's own on this machine. Otherwise a Ray cluster that already runs
    # (simulations/ray_cluster.py): "auto" (the one this machine joined with `ray start`),
    # "ray://HOST:PORT" (Ray Client) or "HOST:PORT" (the head's port).
    address: str = check(ray_address, "")
    # How a cluster's nodes reach each virtual hospital's files: "shared" (storage every node mounts at the
    # same path) or "travel" (each hospital's files go with its tasks: simulations/site_travel.py).
    data: Literal["shared", "travel"] = "shared"

    def __post_init__(self) -> None:
        if self.address and self.cpus:
            raise ValueError("simulation.backend: cpus sizes the Ray a run starts on this machine; a cluster "
                             "(address) has its own cores and Ray refuses the setting there: remove one of them")
        if self.data == "travel" and not self.address:
            raise SettingError("data", "travel is for a Ray cluster (simulation.backend.address); the Ray a run "
                                       "starts on this machine reads the hospitals' folders where they are")


@dataclass(frozen=True)
class SimulationSection:
    sites: int = check(at_least(1), 3)
    seed: int = check(at_least(0), 0)  # same seed, same data, split, stains and results (numpy's seeds are >= 0)
    data: DataSource = field(default_factory=DataSource)
    test_fraction: float = check(lambda f: None if 0 < f < 1 else "must be between 0 and 1 (exclusive)", 0.2)
    val_fraction: float = check(lambda f: None if 0 <= f < 1 else "must be in [0, 1)", 0.2)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    stain_shift: StainShiftConfig = field(default_factory=StainShiftConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)  # cache_dir: shared feature store
    site_privacy: SitePrivacy = field(default_factory=SitePrivacy)
    backend: BackendConfig = field(default_factory=BackendConfig)
    # Seed the virtual sites' DP noise and Poisson sampling from `seed` (reproducible research). Deployed
    # sites never do this: their noise comes from the OS, so a server cannot replay it. Written into the
    # model card as reproducible_noise.
    reproducible_noise: bool = False


def _no_secure_aggregation() -> SecureAggregationConfig:
    return SecureAggregationConfig(enabled=False)


@dataclass(frozen=True)
class SimConfig:
    classes: tuple[str, ...]  # model order; the source's labels are mapped onto these (simulation.data.class_map)
    name: str = "fedpath simulation"
    positive_class: str | None = None
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: LocalTraining = field(default_factory=LocalTraining)
    privacy: PrivacyTarget = field(default_factory=PrivacyTarget)
    # Off by default: on one machine the server is trusted, and SecAgg+ quadruples a round's messages.
    secure_aggregation: SecureAggregationConfig = field(default_factory=_no_secure_aggregation)
    simulation: SimulationSection = field(default_factory=SimulationSection)

    def __post_init__(self) -> None:
        if self.model.trainable == "last_block":  # said here, at load, not after a whole run's training
            raise SettingError("model.trainable", "last_block is not simulated yet (the simulation's test cache "
                                                  "holds tile vectors, not the block's inputs); use it with real sites")
        self.server_config(Path("runs"))  # the server's own cross-field rules
        sim = self.simulation
        if self.federation.min_sites > sim.sites:
            raise SettingError("federation.min_sites", f"{self.federation.min_sites} exceeds simulation.sites "
                                                       f"({sim.sites}): no round could start")
        if self.privacy.required and not sim.site_privacy.enabled:
            raise SettingError("privacy.required", "is true but simulation.site_privacy.enabled is false: every "
                                                   "site would refuse to train; set privacy.required: false to "
                                                   "simulate without DP")
        if sim.features.backbone != self.model.backbone:
            raise SettingError("simulation.features.backbone", f"{sim.features.backbone} and model.backbone "
                                                               f"({self.model.backbone}) must name the same trunk: "
                                                               "the model reads its vectors")
        names = [entry.name for entry in sim.data.class_map]
        if names and sorted(names) != sorted(self.classes):
            raise SettingError("simulation.data.class_map", f"must name each of the classes {list(self.classes)} "
                                                            f"once, got {names}")
        sources = [label for entry in sim.data.class_map for label in entry.labels]
        if len(set(sources)) != len(sources) or not all(entry.labels for entry in sim.data.class_map):
            raise SettingError("simulation.data.class_map", "each class needs its own, non-empty list of labels")

    def source_labels(self) -> dict[str, tuple[str, ...]]:
        """Model class -> the labels (manifest) or folders (tiles) that make it up, in model order."""
        mapping = {entry.name: entry.labels for entry in self.simulation.data.class_map}
        return {name: mapping.get(name, (name,)) for name in self.classes}

    def server_config(self, results_dir: Path, state_dir: Path | None = None) -> ServerConfig:
        """The ServerConfig the ServerApp runs with, exactly as a deployment's server.yaml would give it."""
        server = ServerConfig(classes=self.classes, name=self.name, positive_class=self.positive_class,
                              federation=self.federation, strategy=self.strategy, model=self.model,
                              training=self.training, privacy=self.privacy,
                              secure_aggregation=self.secure_aggregation, results_dir=Path(results_dir))
        if state_dir is not None:
            server = replace(server, superlink=replace(server.superlink, state_dir=Path(state_dir)))
        return server

    def as_dict(self) -> dict:
        return asdict(self)


def parse_sim_config(document: dict, source: str = "<dict>", base_dir: Path | None = None) -> SimConfig:
    """A SimConfig from already-parsed YAML (e.g. an experiment's variant); relative paths from ``base_dir``."""
    return resolve_paths(parse_config(SimConfig, document, source, base_dir), base_dir)


def load_sim_config(path: str | Path) -> SimConfig:
    """Load and validate sim.yaml; relative paths are taken from its folder (the feature store
    defaults to ``cache/`` there, so every run and experiment of one sim.yaml reuses it)."""
    return resolve_paths(load_config(SimConfig, path), Path(path).resolve().parent)


def resolve_paths(config: SimConfig, base_dir: Path | None) -> SimConfig:
    """``config`` with its backbone weights and feature store relative to ``base_dir``, as site.yaml does.

    Args:
        config: a simulation config as parsed.
        base_dir: sim.yaml's folder, or an experiment file's for a simulation written inside it (None: as is).
    """
    sim = config.simulation
    if base_dir is None:
        return config
    weights = sim.features.backbone_weights
    if weights not in BUILTIN_WEIGHTS:
        weights = str((Path(base_dir) / Path(weights).expanduser()).resolve())
    features = replace(sim.features, backbone_weights=weights,
                       cache_dir=sim.features.cache_dir or Path(base_dir) / "cache")
    return replace(config, simulation=replace(sim, features=features))

