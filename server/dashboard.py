"""`fedpath-server dashboard`: a read-only web page for the consortium admin who watches a run for hours.

It shows what `status`, `sites` and `audit verify` print, kept current: the sites (online, registered,
nodes the registry does not name flagged), the runs, the current run's rounds as they finish, its
curves (loss where sites disclose one, accuracy, AUC), ε spent per site against the consortium's budget,
refusals with their reasons, and whether the audit chain holds. Everything comes from the files the
ServerApp already writes (``status.json``, ``metrics.json``, ``audit.jsonl``) and from the SuperLink's
node list on its loopback port; the page changes nothing (GET only).

Who may see it: the page names sites, their ε and why they refused; no patient data exists on the
server. It listens on 127.0.0.1 by default (reach it through an SSH tunnel); bound to another address
it serves HTTPS only, with the SuperLink's certificate from the consortium's CA (``certs/``).

The page is one HTML file (``server/dashboard.html``) drawing with Plotly, whose bundle the ``plotly``
package ships and this server serves itself (hospital and consortium networks are often offline). It
polls ``/api/state`` and the current run every ``REFRESH_S`` seconds.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from server.audit import AuditError, AuditLog, verify
from server.registration import site_rows
from server.run_folder import RunFolder, RunFolderError
from server.server_config import ServerConfig
from server.site_registry import RegistryError, SiteRegistry
from server.superlink import FlowerControl, FlowerError, StatePaths
from shared.errors import UserError
from shared.metrics import is_number
from shared.processes import WILDCARD_HOSTS
from shared.yaml_config import tcp_port

REFRESH_S = 5.0  # how often the page asks for news
SITES_TTL_S = 10.0  # the SuperLink's node list is a `flwr` call (about a second): asked at most this often
PAGE = Path(__file__).with_name("dashboard.html")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CURVES = ("train_loss", "loss", "accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity")


class DashboardError(UserError):
    pass


def _number(value: Any) -> float | None:
    return float(value) if is_number(value) else None  # (is_number: finite only)


class DashboardData:
    """What the page shows, read from the results folder and the SuperLink at each request."""

    def __init__(self, config: ServerConfig, control: FlowerControl | None) -> None:
        self.config, self.control = config, control
        self._sites: tuple[float, dict] | None = None
        self._asking: object | None = None  # the request asking the SuperLink now, if any
        self._lock = threading.Lock()

    def folders(self) -> dict[str, Path]:
        results = Path(self.config.results_dir)
        if not results.is_dir():
            return {}
        return {p.name: p for p in sorted(results.iterdir()) if (p / "run.json").is_file()}

    def overview(self) -> dict:
        runs = []
        for name, path in self.folders().items():
            try:
                folder = RunFolder.open(path)
                status, info = folder.status(), folder.run_info()
            except (RunFolderError, OSError, ValueError) as exc:  # one broken folder hides no other run
                runs.append({"name": name, "state": "unreadable", "round": 0, "total_rounds": None,
                             "best_round": None, "updated": None, "message": str(exc)})
                continue
            runs.append({"name": name, "state": status.get("state", "?"), "round": status.get("round", 0),
                         "total_rounds": info.get("total_rounds"), "best_round": status.get("best_round"),
                         "updated": status.get("updated"), "message": status.get("message")})
        return {"consortium": self.config.name, "results_dir": str(self.config.results_dir), "refresh_s": REFRESH_S,
                "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": runs, **self.sites()}

    def sites(self) -> dict:
        """The sites table, asked from the SuperLink at most every ``SITES_TTL_S`` seconds. Node ids go out as
        text: they are 64-bit, and JavaScript's numbers keep 53 bits. One request asks at a time, outside the
        lock (a `flwr` call may take up to its 120 s timeout); the others meanwhile get the table of before,
        or, before the first answer, the registry alone."""
        with self._lock:
            cached = self._sites
            fresh = cached is not None and time.monotonic() - cached[0] < SITES_TTL_S
            if fresh or self._asking is not None:
                return cached[1] if cached is not None else self._registry_only("asking the SuperLink")
            token = self._asking = object()
        try:
            found = self._ask_sites()
            with self._lock:
                self._sites = (time.monotonic(), found)
            return found
        finally:
            with self._lock:
                if self._asking is token:
                    self._asking = None

    def _ask_sites(self) -> dict:
        try:
            if self.control is None:
                raise FlowerError("not asked (--no-superlink)")
            rows, removed = site_rows(self.config, self.control)
        except (FlowerError, RegistryError) as exc:  # the registry alone: who may join, not who is online
            return self._registry_only(str(exc))
        return {"superlink": {"address": self.config.superlink.loopback_address, "reachable": True, "error": None},
                "removed_keys": removed, "sites": [{**asdict(row), "node_id": str(row.node_id)} for row in rows]}

    def _registry_only(self, why: str) -> dict:
        found: dict = {"superlink": {"address": self.config.superlink.loopback_address, "reachable": False,
                                     "error": why}}
        try:
            entries = SiteRegistry(StatePaths(self.config).registry).entries()
        except RegistryError as error:
            found["superlink"]["error"] = f"{why}; {error}"
            entries = {}
        found["sites"] = [{"name": name, "node_id": str(e["node_id"]), "status": "?",
                           "fingerprint": e["fingerprint"], "registered": e["registered"], "flag": ""}
                          for name, e in sorted(entries.items())]
        return found

    def run(self, name: str) -> dict:
        """One run: its status, every round, ε per site against the budget, refusals, the audit chain.
        Raises KeyError for a name that is not a run folder of this consortium (the name is never a path)."""
        folder = RunFolder.open(self.folders()[name])
        status, info = folder.status(), folder.run_info()
        config = folder.config()
        rounds = _read_rounds(folder.path / "metrics.json")
        sites = sorted({*status.get("sites", {}), *(s for r in rounds for s in r["sites"])})
        epsilon = []
        for site in sites:
            known = status.get("sites", {}).get(site, {})
            refusal = known.get("refusal") or {}
            epsilon.append({"site": site, "epsilon": _number(known.get("epsilon")),
                            "site_budget": _number(refusal.get("budget_epsilon")),
                            "in_last_round": known.get("in_last_round")})
        return {"name": name, "state": status.get("state", "?"), "round": status.get("round", 0),
                "total_rounds": info.get("total_rounds"), "best_round": status.get("best_round"),
                "message": status.get("message"), "updated": status.get("updated"),
                "budget": {"epsilon": config.privacy.epsilon, "delta": config.privacy.delta},
                "rounds": rounds, "sites": sites, "epsilon": epsilon,
                "refusals": _refusals(folder), "audit": _audit(folder, status)}


def _read_rounds(path: Path) -> list[dict]:
    """metrics.json, reduced to numbers: the global model's and each site's, per round."""
    try:
        entries = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # no round recorded yet, or a damaged file: no rounds to show
        return []
    rounds = []
    for entry in entries:
        scores = {k: _number(v) for k, v in entry.get("global", {}).items() if k in CURVES}
        sites = {name: {"epsilon": _number(site.get("epsilon")), "trained": bool(site.get("trained")),
                        "refused": bool(site.get("refused")),
                        **{k: _number(site.get(k)) for k in CURVES if k in site}}
                 for name, site in entry.get("sites", {}).items()}
        rounds.append({"round": entry.get("round"), "global": scores, "sites": sites,
                       "round_s": _number(entry.get("timing", {}).get("round_s"))})
    return rounds


def _refusals(folder: RunFolder) -> list[dict]:
    """Every refusal the audit log records: round, site, code, reason and the numbers a site disclosed."""
    try:
        records = [r for r in AuditLog(folder.audit_log).records() if r.get("event") == "round"]
    except AuditError:  # shown as the audit chain's state
        return []
    found, seen = [], set()
    for record in records:  # each record repeats every site's latest refusal: list each once
        for site, refusal in sorted((record.get("refusals") or {}).items()):
            if (site, refusal.get("round"), refusal.get("code")) in seen:
                continue
            seen.add((site, refusal.get("round"), refusal.get("code")))
            found.append({"round": record.get("round"), "site": site, "code": refusal.get("code"),
                          "reason": refusal.get("reason"), "epsilon_spent": _number(refusal.get("epsilon_spent")),
                          "would_spend": _number(refusal.get("would_spend")),
                          "budget_epsilon": _number(refusal.get("budget_epsilon"))})
    return found


def _audit(folder: RunFolder, status: dict) -> dict:
    try:
        count = verify(folder.audit_log, expected_last_hash=status.get("audit_last_hash"))
        return {"intact": True, "records": count, "error": None}
    except AuditError as exc:
        return {"intact": False, "records": None, "error": str(exc)}


def host_name(header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8050" -> "::1")."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def create_app(data: DashboardData, allowed_hosts: frozenset[str] | None = None):
    """The FastAPI app: the page, Plotly's bundle, and two JSON routes. GET only.

    Args:
        data: what the page shows.
        allowed_hosts: the only names a request's Host header may give (None: any). On loopback, a web
            page the admin opens elsewhere could otherwise rebind its own name to 127.0.0.1 and read the
            JSON routes from the admin's browser (DNS rebinding); over HTTPS the certificate stops that.
    """
    import plotly
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse

    bundle = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    app = FastAPI(title="fedpath dashboard", docs_url=None, redoc_url=None, openapi_url=None)

    if allowed_hosts is not None:
        @app.middleware("http")
        async def this_host_only(request: Request, call_next):
            if host_name(request.headers.get("host", "")).lower() not in allowed_hosts:
                return PlainTextResponse("this dashboard answers only to " + ", ".join(sorted(allowed_hosts)),
                                         status_code=400)
            return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    @app.get("/plotly.min.js")
    def plotly_bundle() -> FileResponse:
        return FileResponse(bundle, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    @app.get("/api/state")
    def state() -> dict:
        return data.overview()

    @app.get("/api/runs/{name}")
    def run(name: str) -> dict:
        try:
            return data.run(name)
        except KeyError:
            raise HTTPException(status_code=404, detail=f"no run {name!r} in {data.config.results_dir}") from None

    return app


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8050, insecure: bool = False,
          superlink: bool = True) -> None:
    """Serve the dashboard until Ctrl-C.

    Args:
        config: the consortium's server.yaml, loaded.
        host: the address to listen on; anything but loopback is served over HTTPS with the SuperLink's
            certificate (``certs/server.pem``, ``server.key``), and refused when those are missing.
        port: the TCP port.
        insecure: the SuperLink runs without TLS (test machines; ``fedpath-server start --insecure``).
        superlink: ask the SuperLink which nodes are online; False shows the registry only.
    """
    import uvicorn

    # Checked here: uvicorn would listen on the port modulo 65536 (70000: 4464) under the URL printed
    # below, and port 0 on a free port that URL would not name.
    if tcp_port(port):
        raise DashboardError(f"--port {port}: {tcp_port(port)}")
    tls: dict = {}
    if host not in LOOPBACK:
        certs = StatePaths(config).certs
        if not (certs.server_cert.is_file() and certs.server_key.is_file()):
            raise DashboardError(f"--host {host}: the dashboard serves other machines over HTTPS only, with the "
                                 f"SuperLink's certificate, and {certs.server_cert} or {certs.server_key} is "
                                 "missing (`fedpath-server init`); or keep the default 127.0.0.1")
        tls = {"ssl_certfile": str(certs.server_cert), "ssl_keyfile": str(certs.server_key)}
        if host in WILDCARD_HOSTS:
            print(f"dashboard: listening on every interface ({host}), HTTPS")
    control = FlowerControl(config, insecure=insecure) if superlink else None
    app = create_app(DashboardData(config, control), frozenset(LOOPBACK) if host in LOOPBACK else None)
    scheme = "https" if tls else "http"
    print(f"dashboard of {config.name}: {scheme}://{host}:{port}/  (read-only; Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", **tls)
