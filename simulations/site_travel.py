"""Virtual hospitals whose files travel with their tasks (``simulation.backend.data: travel``): a Ray
cluster without storage that every node mounts.

A virtual hospital's ClientApp needs its site.yaml, its feature cache (the index and the vectors of its
own items, not the whole shared store), the trunk file when it is one, and its state folder (privacy
ledgers, round records), which it also writes. With ``data: travel``, ``fedpath-sim run`` packs each
hospital into an archive and keeps the archives in one named Ray actor (``SiteStore``) for the length
of the run. Before each message the ClientApp's ``travelling_site`` mod (``client/app.py``) checks its
hospital out onto the node it runs on, into a folder of the node's temporary directory whose site.yaml
names only paths inside it; after the message, also after a failure, it checks the state folder back
in. Flower may run a hospital on a different node each round, so the state travels both ways, every
message, and the store always holds the newest ledger. At the end ``fedpath-sim run`` writes each
hospital's returned state and node id into its folder under ``OUT/sites/`` (as a shared-storage run
would have left them) and removes the copies from every node.

The archives pass through Ray's object store: a hospital's read-only part (its vectors, and the trunk
file when it is one) once per node that runs it (a node keeps its copy while the digest is unchanged),
its state folder every message.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

STORE_NAME = "fedpath-site-store"
INPUTS_MARK = ".inputs-sha256"  # in a checked-out copy: the digest of the inputs it was made from
TRUNK_NAME = "trunk"  # the trunk file's name inside a copy (its suffix kept)


@dataclass(frozen=True)
class Returned:
    """What a hospital's ClientApps checked back in: its state folder and the node id it had."""

    state: bytes  # tar archive of the state folder
    node_id: int | None


def pack_inputs(site_yaml: Path) -> bytes:
    """The read-only part of one virtual hospital as a tar archive whose site.yaml names only paths inside
    it: the site.yaml, the cache index and the feature files it names, the trunk file when it is one.

    Args:
        site_yaml: the virtual hospital's site.yaml (``OUT/sites/site-00k/site.yaml``).
    """
    from client.feature_cache import FeatureCache
    from client.site_config import BUILTIN_WEIGHTS, load_site_config

    config = load_site_config(site_yaml)
    document = yaml.safe_load(Path(site_yaml).read_text())
    cache = FeatureCache(config.features.cache_dir)
    index = cache.read_index()
    files: dict[str, Path] = {"cache/index.json": cache.index_path}
    for record in index.items.values():
        files[f"cache/features/{record['key']}.npz"] = cache.path_for(record["key"])
    features = {**document.get("features", {}), "cache_dir": "cache"}
    if config.features.backbone_weights not in BUILTIN_WEIGHTS:
        trunk = Path(config.features.backbone_weights)
        features["backbone_weights"] = TRUNK_NAME + trunk.suffix
        files[TRUNK_NAME + trunk.suffix] = trunk
    data = dict(document.get("data", {}))
    if data.get("manifest"):  # the list of its items; the slides themselves are not read from the cache
        files["manifest.csv"] = Path(site_yaml).parent / data["manifest"]
        data["manifest"] = "manifest.csv"
    travelled = {**document, "data": data, "features": features, "state_dir": "state"}
    text = ("# checked out by fedpath-sim: a travelling copy of one virtual hospital\n"
            + yaml.safe_dump(travelled, sort_keys=False)).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        _add_bytes(archive, "site.yaml", text)
        if data.get("tile_folder"):  # tiles are read by `prepare` only; the folder must exist for site.yaml
            _add_folder(archive, str(data["tile_folder"]))
        for name, path in sorted(files.items()):
            archive.add(str(path), arcname=name, recursive=False)
    return buffer.getvalue()


def pack_folder(folder: Path) -> bytes:
    """A tar archive of ``folder``'s files (empty when it does not exist)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        if Path(folder).is_dir():
            for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
                archive.add(str(path), arcname=str(path.relative_to(folder)), recursive=False)
    return buffer.getvalue()


def unpack(archive: bytes, folder: Path) -> None:
    """Extract a pack into ``folder``; names that would leave it (``..``, absolute, links) are refused."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as opened:
        opened.extractall(folder, filter="data")


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o600
    archive.addfile(info, io.BytesIO(data))


def _add_folder(archive: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o700
    archive.addfile(info)


class SiteStore:
    """The Ray actor that holds every virtual hospital of one run while it runs (created by
    ``ray_cluster.cluster_run``, named ``STORE_NAME`` in the run's own namespace)."""

    def __init__(self, inputs: dict[str, bytes], states: dict[str, bytes]) -> None:
        self._inputs = inputs
        self._digests = {site: hashlib.sha256(data).hexdigest() for site, data in inputs.items()}
        self._states = dict(states)
        self._node_ids: dict[str, int] = {}

    def sites(self) -> list[str]:
        """The virtual hospitals it holds (a cheap call: the run waits on it before the first round)."""
        return sorted(self._inputs)

    def check_out(self, site: str, have: str | None) -> tuple[str, bytes | None, bytes]:
        """The inputs' digest, the inputs themselves unless the node ``have`` them already, the newest state."""
        digest = self._digests[site]
        return digest, None if have == digest else self._inputs[site], self._states[site]

    def check_in(self, site: str, state: bytes, node_id: int) -> None:
        self._states[site] = state
        self._node_ids[site] = node_id

    def returned(self) -> dict[str, Returned]:
        return {site: Returned(state, self._node_ids.get(site)) for site, state in self._states.items()}


def local_root(namespace: str) -> Path:
    """Where a node keeps its copies of the run's hospitals (its own temporary directory)."""
    return Path(tempfile.gettempdir()) / "fedpath-travel" / namespace


def local_site_yaml(namespace: str, site: str) -> Path:
    return local_root(namespace) / site / "site.yaml"


def _store(namespace: str):
    import ray

    return ray.get_actor(STORE_NAME, namespace=namespace)


def check_out(namespace: str, site: str) -> Path:
    """On the node a ClientApp runs on: the hospital's inputs (again only when they changed) and its
    newest state, in this node's copy; its site.yaml. Runs inside a Ray worker (Flower's actor)."""
    import ray

    folder = local_site_yaml(namespace, site).parent
    mark = folder / INPUTS_MARK
    have = mark.read_text() if mark.is_file() else None
    digest, inputs, state = ray.get(_store(namespace).check_out.remote(site, have))  # one call per message
    if inputs is not None:
        shutil.rmtree(folder, ignore_errors=True)
        unpack(inputs, folder)
        mark.write_text(digest)
    shutil.rmtree(folder / "state", ignore_errors=True)
    unpack(state, folder / "state")
    return folder / "site.yaml"


def check_in(namespace: str, site: str, node_id: int) -> None:
    """The hospital's state folder back into the store, before the reply leaves (the next message may
    run on another node)."""
    import ray

    folder = local_site_yaml(namespace, site).parent
    ray.get(_store(namespace).check_in.remote(site, pack_folder(folder / "state"), int(node_id)))


def remove_local(namespace: str) -> bool:
    """Runs on every node at the end of a run: its copies of the run's hospitals go."""
    root = local_root(namespace)
    existed = root.exists()
    shutil.rmtree(root, ignore_errors=True)
    return existed


def write_back(returned: dict[str, Returned], site_yamls: dict[str, Path], node_id_file: str) -> list[str]:
    """Each hospital's returned state into its own state folder and its node id beside its site.yaml,
    as a shared-storage run would have left them; the names of the hospitals written.

    The returned state replaces the files of the same name (the ClientApps started from the
    folder's content, so nothing newer can be there); other files stay.
    """
    from client.site_config import load_site_config

    written = []
    for site, back in sorted(returned.items()):
        site_yaml = site_yamls[site]
        staging = Path(tempfile.mkdtemp(prefix=f"{site}-state-", dir=site_yaml.parent))
        try:
            unpack(back.state, staging)
            state_dir = load_site_config(site_yaml).state_dir
            for path in sorted(p for p in staging.rglob("*") if p.is_file()):
                target = state_dir / path.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                path.replace(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if back.node_id is not None:
            (site_yaml.parent / node_id_file).write_text(f"{back.node_id}\n")
        written.append(site)
    return written

