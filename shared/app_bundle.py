"""Which fedpath code an app bundle (Flower's FAB) holds, as one digest both sides can compare.

A hospital runs only the fedpath version it installed and approved. The consortium submits its
app as a FAB (``flwr run`` zips the files ``[tool.flwr.app] fab-include`` selects), so a site
needs one number that says "these are exactly the files of my installed version":

    digest = sha256 of the canonical JSON list [[path, sha256(content)], ...] of every file in
             the bundle, sorted by path, except Flower's own manifest ``.info/CONTENT``

Why not the sha256 of the FAB's bytes (Flower's ``fab_hash``)? Flower builds FABs with a fixed
date and sorted paths, so on one machine the bytes repeat, but they still depend on zlib's
deflate output and on how ``tomli_w`` re-writes ``pyproject.toml``; the same files zipped on
the admin's machine and on the hospital's can differ in bytes. The content digest depends only
on paths and contents: not on timestamps, compression, member order or directory entries.

Why not Flower's manifest ``.info/CONTENT`` (path, sha256 and size of every file)? It is
written by whoever built the bundle: a forged manifest can list other files than the bundle
holds. The digest reads the files themselves and ignores the manifest.

The installed version's digest is computed the way ``flwr run`` builds the bundle (Flower's
``build_fab_from_files`` on the files of the folder that holds fedpath's ``pyproject.toml`` and
packages), in memory; nothing is written or installed. Only the top-level folders ``fab-include``
names are read (:func:`app_files`): Flower's own ``build_fab_from_disk`` walks and resolves every
file under the folder first, and a repository with its ``.venv`` inside holds some 50,000 (4 s of
CPU here, for every task runner start and every ``flwr run``; the consortium submits a copy of the
app's files, :func:`stage_app`, for the same reason). The site's task runner compares every
submitted bundle with it; ``fedpath-site bundle-digest`` prints it for hospital IT and
:func:`installed_bundle_report` prints it for the consortium admin.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from shared.errors import UserError

FLOWER_MANIFEST = ".info/CONTENT"
"""Flower's list of the bundle's files (``flwr/cli/build.py``): written by the submitter, not trusted."""

MAX_UNCOMPRESSED_BYTES = 256 * 1024 * 1024
"""Bundles that inflate to more are refused (Flower caps the FAB at 10 MB compressed)."""

DIGEST_PATTERN = re.compile(r"^(sha256:)?[0-9a-f]{64}$")
DIGEST_FORMAT_HELP = "a bundle digest is 64 hexadecimal characters, optionally prefixed with 'sha256:'"


class BundleError(UserError):
    """The bundle cannot be read as a Flower app bundle, or the installed app cannot be built."""


def normalise_digest(value: str) -> str:
    """``value`` as 64 lower-case hex characters; BundleError if it is not a digest."""
    text = str(value).strip().lower()
    if not DIGEST_PATTERN.match(text):
        raise BundleError(f"{value!r} is not a bundle digest: {DIGEST_FORMAT_HELP} "
                          "(`fedpath-site bundle-digest` prints one)")
    return text.removeprefix("sha256:")


def digest_problem(value: str) -> str | None:
    """For config checks: None if ``value`` is a bundle digest, else what is wrong."""
    return None if DIGEST_PATTERN.match(str(value).strip().lower()) else DIGEST_FORMAT_HELP


def bundle_digest(fab: bytes) -> str:
    """The content digest of a FAB's bytes (see the module docstring).

    Args:
        fab: the bundle as Flower ships it (a zip archive).

    Raises BundleError for bytes that are not a zip, a member name that appears twice (a
    zip may hold both; which one an installer would use is not defined), or a bundle that
    inflates beyond ``MAX_UNCOMPRESSED_BYTES``.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except (zipfile.BadZipFile, ValueError) as error:
        raise BundleError(f"the bundle is not a zip archive ({error})") from None
    entries: dict[str, str] = {}
    total = 0
    with archive:
        for info in archive.infolist():
            if info.is_dir() or info.filename == FLOWER_MANIFEST:
                continue
            if info.filename in entries:
                raise BundleError(f"the bundle holds '{info.filename}' twice")
            digest = hashlib.sha256()
            try:
                with archive.open(info) as member:
                    while chunk := member.read(1 << 20):
                        total += len(chunk)
                        if total > MAX_UNCOMPRESSED_BYTES:
                            raise BundleError(f"the bundle inflates to more than {MAX_UNCOMPRESSED_BYTES} bytes")
                        digest.update(chunk)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as error:
                raise BundleError(f"the bundle's member '{info.filename}' cannot be read ({error})") from None
            entries[info.filename] = digest.hexdigest()
    return files_digest(entries)


def files_digest(file_hashes: dict[str, str]) -> str:
    """The digest of ``{path: sha256 hex of content}``: sha256 of the sorted [[path, hash], ...] as
    compact JSON (JSON keeps any path unambiguous, whatever characters it holds)."""
    listing = json.dumps(sorted(file_hashes.items()), separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(listing.encode("ascii")).hexdigest()


def installed_app_dir() -> Path:
    """The folder of the installed fedpath app: the one holding ``pyproject.toml`` next to the
    ``client``, ``server`` and ``shared`` packages (the repository for an editable install)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise BundleError(
            f"the installed fedpath at {root} has no pyproject.toml beside its packages, so its app bundle "
            "cannot be built: install fedpath from its repository (`pip install -e .`), as the consortium "
            "does to submit it")
    return root


ALWAYS_READ = ("pyproject.toml", ".gitignore")  # what Flower's build reads beside the included files
GLOB = re.compile(r"[*?\[]")


def app_files(app_dir: Path) -> dict[str, Path]:
    """The files of ``app_dir`` that Flower's build can select, as its ``collect_files`` maps them
    (relative POSIX path to absolute path; symlinks and paths resolving outside the folder left out),
    read only under the top-level names the ``fab-include`` patterns of its ``pyproject.toml`` start
    with. Without ``fab-include``, or with a pattern that starts with a wildcard, every file (Flower's
    own walk).

    Args:
        app_dir: the app folder (holding ``pyproject.toml``).
    """
    from flwr.cli.utils import collect_files

    root = Path(app_dir).expanduser().resolve()
    tops = _included_tops(root)
    if tops is None:
        return collect_files(root)
    files: dict[str, Path] = {}
    for top in sorted(set(tops) | set(ALWAYS_READ)):
        start = root / top
        if start.is_file() and not start.is_symlink():
            files[top] = start
        elif start.is_dir() and not start.is_symlink():
            for folder, subfolders, names in os.walk(start, followlinks=False):
                subfolders[:] = [d for d in subfolders if d != "__pycache__"]  # Flower excludes them anyway
                for name in names:
                    path = Path(folder) / name
                    if not path.is_symlink() and path.resolve().is_relative_to(root):
                        files[path.relative_to(root).as_posix()] = path
    return files


def _included_tops(root: Path) -> list[str] | None:
    """The first path segment of every ``fab-include`` pattern, or None when one is a wildcard."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the same parser under its old name (a Flower dependency)
        import tomli as tomllib
    try:
        config = tomllib.loads((root / "pyproject.toml").read_text())
    except (OSError, ValueError):
        return None  # Flower's build says what is wrong
    patterns = config.get("tool", {}).get("flwr", {}).get("app", {}).get("fab-include")
    if not isinstance(patterns, list) or not patterns:
        return None
    tops = [str(pattern).lstrip("/").split("/", 1)[0] for pattern in patterns]
    return None if any(not top or GLOB.search(top) or top in (".", "..") for top in tops) else tops


def installed_bundle(app_dir: Path | None = None) -> bytes:
    """The FAB ``flwr run`` would submit for the installed app, built in memory.

    Args:
        app_dir: the app folder; default :func:`installed_app_dir`.
    """
    # flwr/cli/build.py: the function `flwr run` builds with (public module-level function of Flower's
    # CLI, the core of its build_fab_from_disk), so the bundle holds exactly what a submission holds.
    from flwr.cli.build import build_fab_from_files

    folder = installed_app_dir() if app_dir is None else Path(app_dir)
    try:
        with warnings.catch_warnings():  # pathspec's deprecation notices about Flower's own patterns
            warnings.simplefilter("ignore", DeprecationWarning)
            return build_fab_from_files(app_files(folder))[0]
    except ValueError as error:  # Flower's own problems with the folder (pyproject, patterns, depth)
        raise BundleError(f"cannot build the app bundle of {folder}: {error}") from None


def stage_app(app_dir: Path, target: Path) -> Path:
    """Copy the files :func:`app_files` reads into the empty folder ``target``: ``flwr run`` on it
    submits the same bundle as on ``app_dir``, without walking what else ``app_dir`` holds.

    Args:
        app_dir: the app folder.
        target: where the copy goes (created; must not exist or be empty).
    """
    target.mkdir(parents=True, exist_ok=True)
    for relative, source in app_files(app_dir).items():
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)
    return target


def installed_digest(app_dir: Path | None = None) -> str:
    """The content digest of the installed app's bundle (what the consortium's submission of this
    same version must match)."""
    return bundle_digest(installed_bundle(app_dir))


@dataclass(frozen=True)
class BundleInfo:
    app_dir: Path
    version: str
    files: int
    digest: str
    fab_sha256: str  # Flower's fab_hash of these bytes on this machine (may differ elsewhere)


def installed_bundle_info(app_dir: Path | None = None) -> BundleInfo:
    """What :func:`installed_bundle_report` prints, as data."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the same parser under its old name (a Flower dependency)
        import tomli as tomllib

    folder = installed_app_dir() if app_dir is None else Path(app_dir)
    fab = installed_bundle(folder)
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        files = sum(1 for info in archive.infolist() if not info.is_dir() and info.filename != FLOWER_MANIFEST)
    version = tomllib.loads((folder / "pyproject.toml").read_text()).get("project", {}).get("version", "?")
    return BundleInfo(folder, str(version), files, bundle_digest(fab), hashlib.sha256(fab).hexdigest())


def installed_bundle_report(app_dir: Path | None = None) -> str:
    """Lines for a terminal: the installed version's bundle digest and where it comes from.

    Args:
        app_dir: the app folder; default :func:`installed_app_dir`.

    The consortium admin announces this digest with each release (`fedpath-server
    bundle-digest`); a hospital compares it with its own (`fedpath-site bundle-digest`).
    """
    info = installed_bundle_info(app_dir)
    return (f"fedpath {info.version} bundle digest: sha256:{info.digest}\n"
            f"  app folder {info.app_dir}, {info.files} files (pyproject.toml [tool.flwr.app] fab-include)\n"
            f"  Flower's fab_hash of this build here: {info.fab_sha256} (zip bytes; may differ on another machine)")
