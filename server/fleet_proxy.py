"""The sites' port: nginx in front of the SuperLink, passing the Fleet API and nothing else.

Why: in Flower 1.42 the SuperLink's one HTTP port serves the Fleet API (what SuperNodes use), the
Control API (start a run, register a key, list nodes: no login in this build), the Runtime API
(a ServerApp task can be acquired without a credential), ``/docs``, ``/openapi.json`` and
``/health``. Anyone who reached that port with the consortium CA certificate, which every
hospital holds, could submit a run that every hospital executes, or register a key of their own
and join as a "hospital". So the SuperLink listens on 127.0.0.1 only (``superlink.loopback_port``)
and the port the hospitals reach is nginx (the operating system's package, patched by its
security updates), which passes ``POST /v1/fleet/<route>`` and answers everything else with 404
without contacting the SuperLink. The two pull routes go through fedpath's pull relay on loopback
(server/pull_relay.py), which holds a pull while the SuperLink's answer is "not yet", and so do the
two push routes, passed on unchanged (the relay tells the ServerApp when the replies are complete).

With TLS (the default) nginx terminates the sites' TLS with the consortium's server certificate
and opens a second TLS connection to the SuperLink on loopback, checking it against the
consortium CA: Flower's SuperNode authentication requires the SuperLink to run with TLS. The
headers Flower's node authentication signs (``flwr-public-key``, ``flwr-signature``,
``flwr-timestamp``) pass unchanged, so authentication stays end to end between SuperNode and
SuperLink; nginx holds no site credential.

The configuration is generated from server.yaml into ``state_dir/proxy/nginx.conf`` at every
start (atomically, mode 0600), checked with ``nginx -t``, and nginx runs with ``daemon off`` as a
process of fedpath's own (shared/processes.py: pid file, bounded waits, stop by PID). Every file
nginx writes is in the state folder; nothing under /var.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from server.certificates import ConsortiumFiles, describe
from server.pull_relay import HELD_ROUTES, PASSED_ROUTES
from server.server_config import LOOPBACK, SuperLinkConfig
from shared.atomic_files import atomic_write_bytes
from shared.errors import UserError
from shared.processes import connect_host, start, stop, tail

INSTALL_ADVICE = ("install it as root with `apt-get install nginx-light` (Debian, Ubuntu; elsewhere the "
                  "distribution's nginx package), then run this command again")
MIN_VERSION = (1, 19, 5)  # `nginx -e` (error log before the config is read) and upstream keepalive_timeout
UPSTREAM_NAME = "localhost"  # a DNS name of the server certificate (certificates.LOOPBACK_NAMES); nginx checks DNS SANs
FLEET_ROUTE = r"^/v1/fleet/[a-z][a-z-]*$"  # raw request URI: no query, no encoded, doubled or dot segments
# Extra search places: nginx lives in /usr/sbin, which a non-root PATH often lacks.
SEARCH_PATH = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class ProxyError(UserError):
    pass


@dataclass(frozen=True)
class ProxyFiles:
    """The proxy's files, all in the server's state folder."""

    dir: Path
    conf: Path
    pid: Path  # fedpath's pid file (daemon off: the master is the process fedpath started)
    nginx_pid: Path  # nginx's own: it empties and rewrites it after it listens, so never the same file as `pid`
    error_log: Path
    access_log: Path
    temp: Path

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> ProxyFiles:
        folder = Path(state_dir) / "proxy"
        return cls(folder, folder / "nginx.conf", Path(state_dir) / "proxy.pid", folder / "nginx.pid",
                   folder / "error.log", folder / "access.log", folder / "temp")


@dataclass(frozen=True)
class Nginx:
    path: str
    version: tuple[int, ...]
    configure: str  # `nginx -V`: which modules were compiled in

    def has_module(self, name: str) -> bool:
        return f"--without-{name}_module" not in self.configure


def find_nginx() -> Nginx:
    """The installed nginx, checked to be recent enough; a clear error saying how to install it."""
    search = os.pathsep.join([os.environ.get("PATH", ""), *SEARCH_PATH])
    path = shutil.which("nginx", path=search)
    if path is None:
        raise ProxyError(f"nginx is not installed, and the SuperLink's public port is an nginx proxy that passes "
                         f"only the Fleet API to it (docs/control-plane.md): {INSTALL_ADVICE}")
    try:
        out = subprocess.run([path, "-V"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProxyError(f"{path} does not run ({exc}): reinstall nginx; {INSTALL_ADVICE}") from None
    text = out.stderr + out.stdout
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", text)
    version = tuple(int(part) for part in match.groups()) if match else ()
    if version and version < MIN_VERSION:
        raise ProxyError(f"{path} is nginx {'.'.join(map(str, version))}; the proxy needs "
                         f"{'.'.join(map(str, MIN_VERSION))} or later: update the nginx package")
    return Nginx(path, version, text)


def nginx_config(superlink: SuperLinkConfig, files: ProxyFiles, tls: ConsortiumFiles | None, nginx: Nginx,
                 relay_port: int | None = None) -> str:
    """The proxy's nginx.conf: ``tls`` None (``--insecure``) is the same proxy in plain HTTP;
    with ``relay_port`` the sites' pulls and pushes go to the pull relay on that loopback port
    (server/pull_relay.py), every other Fleet route straight to the SuperLink."""
    scheme, ssl_listen = ("https", " ssl") if tls else ("http", "")
    temp_paths = "\n".join(f"    {module}_temp_path {_quote(files.temp / module)};"
                           for module in ("fastcgi", "uwsgi", "scgi") if nginx.has_module(f"http_{module}"))
    front_tls = upstream_tls = ""
    if tls:
        front_tls = f"""
        ssl_certificate {_quote(tls.server_cert)};
        ssl_certificate_key {_quote(tls.server_key)};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers ECDHE+AESGCM:ECDHE+CHACHA20;
        ssl_prefer_server_ciphers off;
        ssl_session_cache shared:fedpath_tls:1m;
        ssl_session_timeout 1h;
        ssl_session_tickets off;            # forward secrecy: no long-lived ticket key in memory
"""
        upstream_tls = f"""
            # Second TLS leg to the SuperLink, which must run TLS for SuperNode authentication; it
            # must present a certificate of the consortium CA naming {UPSTREAM_NAME}.
            proxy_ssl_trusted_certificate {_quote(tls.ca_cert)};
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_name {UPSTREAM_NAME};
            proxy_ssl_server_name on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_session_reuse on;
"""
    # With the relay, only its two push routes carry large bodies (models); every other Fleet request is a few
    # ids, and Flower's SuperLink reads a body whole before it checks who sent it.
    small = 1 if relay_port is not None else superlink.max_request_mb
    locations = _location("/v1/fleet/", f"{scheme}://fedpath_superlink", upstream_tls, max_body_mb=small)
    relay_upstream = ""
    if relay_port is not None:
        relay_upstream = f"""
    upstream fedpath_pull_relay {{     # server/pull_relay.py: holds a pull whose answer is 'not yet'
        server {LOOPBACK}:{relay_port};
        keepalive 16;
        keepalive_timeout 60s;
    }}
"""
        held = [_location(f"= {path}", "http://fedpath_pull_relay", read_timeout_s=int(superlink.pull_hold_s) + 60,
                          max_body_mb=1) for path in HELD_ROUTES]
        passed = [_location(f"= {path}", "http://fedpath_pull_relay", max_body_mb=superlink.max_request_mb)
                  for path in PASSED_ROUTES]
        locations = "\n".join([*held, *passed, locations])
    user = ("# Started as root: the master reads the keys and opens the logs, the worker drops to nginx's\n"
            "# unprivileged default user (nobody). It writes no file: bodies stream, responses stay in memory.\n"
            if os.geteuid() == 0 else "")
    return f"""# Generated by `fedpath-server start` from server.yaml at every start: edits here are lost.
# The hospitals' port. Passes POST /v1/fleet/<route> (Flower's Fleet API) to the SuperLink on
# {LOOPBACK}:{superlink.loopback}; refuses everything else (Control API, Runtime API, /docs,
# /openapi.json, /health) with 404 without contacting it. Why: server/fleet_proxy.py.
daemon off;                             # a fedpath process: pid file, stopped by PID
master_process on;
worker_processes 1;
pid {_quote(files.nginx_pid)};
lock_file {_quote(files.dir / "nginx.lock")};
error_log {_quote(files.error_log)} warn;
{user}
events {{
    worker_connections 1024;
}}

http {{
    log_format fedpath '$time_iso8601 $remote_addr "$request" $status $body_bytes_sent '
                       'request_bytes=$request_length upstream=$upstream_addr '
                       'upstream_status=$upstream_status seconds=$request_time done=$msec';
    access_log {_quote(files.access_log)} fedpath;
    server_tokens off;
    default_type application/octet-stream;

    # Nothing under /var: nginx creates its temporary folders here (it never fills them, below).
    client_body_temp_path {_quote(files.temp / "body")};
    proxy_temp_path {_quote(files.temp / "proxy")};
{temp_paths}

    # Exact Fleet routes only, judged on the URI as sent: the SuperLink routes on the decoded
    # path, so an encoded, doubled or dot segment never reaches it.
    map $request_uri $fedpath_fleet_route {{
        "~{FLEET_ROUTE}" 1;
        default 0;
    }}

    upstream fedpath_superlink {{
        server {LOOPBACK}:{superlink.loopback};
        keepalive 16;                   # HTTP/1.1 connections to the SuperLink, reused
        keepalive_timeout 4s;           # under uvicorn's 5 s: never reuse one uvicorn is closing
        keepalive_requests 1000;
    }}
{relay_upstream}
    server {{
        listen {_listen(superlink.host, superlink.port)}{ssl_listen};
        server_name _;
{front_tls}
        client_header_timeout 30s;
        client_body_timeout 120s;       # between two reads of a body, not for all of it
        send_timeout 300s;
        keepalive_timeout 75s;
        client_max_body_size {superlink.max_request_mb}m;  # Flower sends arrays in 5 MB chunks

{locations}
        location / {{
            return 404;
        }}
    }}
}}
"""


def _location(match: str, target: str, upstream_tls: str = "", read_timeout_s: int = 300,
              max_body_mb: int = 1) -> str:
    """One proxied location: the Fleet route check, POST only, the largest body, how bodies and headers pass."""
    return f"""        location {match} {{
            if ($fedpath_fleet_route = 0) {{
                return 404;
            }}
            limit_except POST {{
                deny all;
            }}
            client_max_body_size {max_body_mb}m;
            proxy_pass {target};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;  # the SuperLink's log names the site's address
            proxy_set_header X-Forwarded-Proto $scheme;
            # Every other request header passes unchanged, Flower's node authentication
            # (flwr-public-key, flwr-signature, flwr-timestamp) and version headers included.

            # Model updates stream through (a few MB per request) instead of being spooled to disk:
            # no temporary file, so no disk to fill and nothing the unprivileged worker must write.
            proxy_request_buffering off;
            client_body_buffer_size 1m;
            proxy_buffering on;
            proxy_max_temp_file_size 0;
            proxy_buffer_size 64k;
            proxy_buffers 16 64k;
            proxy_busy_buffers_size 128k;

            proxy_connect_timeout 10s;
            proxy_send_timeout 300s;        # Fleet calls are short; a SuperLink this slow is stuck
            proxy_read_timeout {read_timeout_s}s;
{upstream_tls}        }}
"""


def prepare_proxy(superlink: SuperLinkConfig, files: ProxyFiles, tls: ConsortiumFiles | None,
                  relay_port: int | None = None) -> Nginx:
    """Find nginx, write the configuration (pulls through the relay on ``relay_port`` if given) and
    have nginx check it; nothing is started."""
    nginx = find_nginx()
    if tls is not None and UPSTREAM_NAME not in describe(tls.server_cert)["sans"]:
        raise ProxyError(f"{tls.server_cert} does not name {UPSTREAM_NAME}, which the proxy checks when it connects to "
                         "the SuperLink on loopback: issue a new one with `fedpath-server renew-cert --name HOST`")
    files.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(files.dir, 0o700)
    files.temp.mkdir(exist_ok=True)
    atomic_write_bytes(files.conf, nginx_config(superlink, files, tls, nginx, relay_port).encode(), mode=0o600)
    try:
        result = subprocess.run([*_base_command(nginx, files), "-t", "-q"], capture_output=True, text=True,
                                timeout=60, check=False)
    except subprocess.TimeoutExpired:
        raise ProxyError(f"`{nginx.path} -t` did not finish within 60 s checking {files.conf}") from None
    if result.returncode != 0:
        raise ProxyError(f"nginx refused the generated configuration {files.conf}:\n"
                         f"{(result.stderr + result.stdout).strip()}")
    return nginx


def start_proxy(superlink: SuperLinkConfig, files: ProxyFiles, tls: ConsortiumFiles | None, nginx: Nginx,
                ready_timeout: float = 30.0) -> subprocess.Popen:
    """Start nginx on the sites' port (config from ``prepare_proxy``); return once a Fleet request
    it passes has reached the SuperLink, so a broken chain fails here and not at the sites."""
    process = start(_base_command(nginx, files), files.error_log, files.pid, {"PATH": os.environ.get("PATH", "")},
                    "the SuperLink's proxy (nginx)", ready_port=(superlink.host, superlink.port),
                    ready_timeout=ready_timeout)
    try:
        _check_chain(superlink, files, tls, ready_timeout)
    except BaseException:
        stop(files.pid)
        raise
    return process


def _check_chain(superlink: SuperLinkConfig, files: ProxyFiles, tls: ConsortiumFiles | None, timeout: float) -> None:
    """POST an empty Fleet request through the proxy: any answer of the SuperLink proves the chain
    (Flower refuses it: no node, no signature); 502/504 from nginx means it cannot reach or verify it."""
    deadline = time.monotonic() + timeout
    while True:
        status, problem = _probe(superlink, tls)
        if problem is None and status not in (502, 503, 504):
            return
        if time.monotonic() > deadline:
            detail = problem or f"HTTP {status}: nginx cannot connect to it or does not trust its certificate"
            raise ProxyError(f"the proxy on {superlink.address} does not reach the SuperLink on "
                             f"{superlink.loopback_address} ({detail}); last lines of {files.error_log}:\n"
                             f"{tail(files.error_log, 3)}")
        time.sleep(0.5)


def _probe(superlink: SuperLinkConfig, tls: ConsortiumFiles | None) -> tuple[int | None, str | None]:
    try:
        raw = socket.create_connection((connect_host(superlink.host), superlink.port), timeout=10)
        with raw if tls is None else ssl.create_default_context(cafile=str(tls.ca_cert)).wrap_socket(
                raw, server_hostname=UPSTREAM_NAME) as sock:  # a failed handshake closes raw with it
            sock.sendall(b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/protobuf\r\n"
                         b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            response = http.client.HTTPResponse(sock)
            response.begin()
            return response.status, None
    except (OSError, http.client.HTTPException) as exc:
        return None, str(exc)


def _base_command(nginx: Nginx, files: ProxyFiles) -> list[str]:
    # -e: nginx's own start-up errors go to our log, not to its compiled-in path under /var.
    return [nginx.path, "-p", f"{files.dir}/", "-c", str(files.conf), "-e", str(files.error_log)]


def _listen(host: str, port: int) -> str:
    if not host:
        return str(port)  # every interface, as an empty host means to Flower
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _quote(path: Path) -> str:
    text = str(path)
    if "$" in text or any(ord(c) < 32 for c in text):
        raise ProxyError(f"{text}: nginx would read '$' or a control character in this path as something else; "
                         "use a state_dir and certs_dir without them")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
