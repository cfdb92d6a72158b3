"""One folder per federated run: everything an admin or auditor needs, in plain files.

    runs/20261125-221500/
      server.yaml        the config as the admin wrote it
      config.json        the same, validated and with absolute paths (what the ServerApp reads)
      run.json           federation id, config sha256, Flower run ids (one per start or resume)
      status.json        state, last round, sites and their ε, refusals (what `status` shows)
      audit.jsonl        hash-chained record of every round
      checkpoints/       round-NNNN.npz + model card .json, latest.*, best.*
      metrics.json/.csv, curves.png
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from server.server_config import ServerConfig, load_server_config
from shared.atomic_files import atomic_write_json
from shared.errors import UserError
from shared.metrics import to_jsonable
from shared.run_dirs import new_run_dir
from shared.yaml_config import parse_config


class RunFolderError(UserError):
    pass


class RunFolder:
    def __init__(self, path: Path) -> None:
        self.path = Path(path).resolve()

    # files
    @property
    def config_json(self) -> Path:
        return self.path / "config.json"

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def status_json(self) -> Path:
        return self.path / "status.json"

    @property
    def audit_log(self) -> Path:
        return self.path / "audit.jsonl"

    @property
    def federation_id(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, config_path: Path) -> "RunFolder":
        """A new run folder under the config's results_dir, holding the config it was started with."""
        config = load_server_config(config_path)
        folder = cls(new_run_dir(Path(config.results_dir)))
        shutil.copyfile(config_path, folder.path / "server.yaml")
        document = json.loads(json.dumps(to_jsonable(config.as_dict()), default=str))  # paths as text
        atomic_write_json(folder.config_json, document)
        atomic_write_json(folder.run_json, {
            "federation_id": folder.federation_id,
            "created": _now(),
            "config_sha256": config_sha256(document),
            "total_rounds": config.federation.rounds,
            "flower_runs": [],
        })
        return folder

    @classmethod
    def open(cls, path: Path) -> "RunFolder":
        folder = cls(path)
        for required in (folder.config_json, folder.run_json):
            if not required.is_file():
                raise RunFolderError(f"{folder.path} is not a fedpath run folder ({required.name} is missing)")
        return folder

    def config(self) -> ServerConfig:
        return parse_config(ServerConfig, _read_json(self.config_json), str(self.config_json))

    def run_info(self) -> dict:
        return _read_json(self.run_json)

    def add_flower_run(self, run_id: int) -> None:
        info = self.run_info()
        info["flower_runs"] = [*info.get("flower_runs", []), run_id]
        atomic_write_json(self.run_json, info)

    def status(self) -> dict:
        return _read_json(self.status_json) if self.status_json.exists() else {"state": "submitted", "round": 0}

    def write_status(self, **fields) -> dict:
        status = {**self.status(), **fields, "updated": _now()}
        atomic_write_json(self.status_json, to_jsonable(status))
        return status


def config_sha256(document: dict) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{path}: missing") from None
    except (OSError, ValueError) as exc:
        raise RunFolderError(f"{path}: unreadable ({exc})") from None
    if not isinstance(document, dict):
        raise RunFolderError(f"{path}: expected a JSON object, found {type(document).__name__}")
    return document


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
