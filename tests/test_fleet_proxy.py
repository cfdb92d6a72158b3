"""The proxy on the sites' port, before any process: the nginx.conf it generates, nginx's own check
of it, and what `fedpath-server start` says when nginx is missing or refuses. The real processes
and an outsider's attempts: tests/test_control_plane.py."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from server import fleet_proxy
from server.certificates import init_consortium
from server.cli import main as server_main
from server.fleet_proxy import FLEET_ROUTE, ProxyError, ProxyFiles, nginx_config, prepare_proxy
from server.server_config import load_server_config
from server.superlink import StatePaths, stop_server
from shared.processes import connect_host, free_port


def _config(tmp_path: Path, **superlink):
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump({"classes": ["a", "b"], "superlink": {"port": 9500, **superlink}}))
    return load_server_config(path)


def test_tls_config_passes_only_fleet_routes_and_verifies_the_superlink(tmp_path, nginx):
    config = _config(tmp_path, host="0.0.0.0", loopback_port=9600, max_request_mb=32)
    tls = init_consortium(tmp_path / "certs", "fl.example")
    files = ProxyFiles.in_state_dir(config.superlink.state_dir)
    text = nginx_config(config.superlink, files, tls, nginx)
    assert "listen 0.0.0.0:9500 ssl;" in text
    assert "server 127.0.0.1:9600;" in text and "proxy_pass https://fedpath_superlink;" in text
    assert f'ssl_certificate "{tls.server_cert}";' in text and f'ssl_certificate_key "{tls.server_key}";' in text
    for line in (f'proxy_ssl_trusted_certificate "{tls.ca_cert}";', "proxy_ssl_verify on;",
                 "proxy_ssl_name localhost;", "proxy_http_version 1.1;", 'proxy_set_header Connection "";',
                 "client_max_body_size 32m;", "proxy_request_buffering off;", "proxy_max_temp_file_size 0;",
                 "daemon off;", f'pid "{files.nginx_pid}";'):
        assert line in text, line
    # nginx truncates its pid file after it listens: sharing fedpath's would let a reader find it empty
    assert str(files.pid) not in text
    assert "location / {\n            return 404;" in text  # everything that is not a Fleet route
    assert "/var/" not in text  # every path nginx writes is in the state folder
    assert text.count("proxy_pass") == 1


def test_with_the_relay_only_the_two_pulls_and_two_pushes_go_to_it_and_the_same_checks_apply(tmp_path, nginx):
    config = _config(tmp_path, loopback_port=9600)
    tls = init_consortium(tmp_path / "certs", "fl.example")
    files = ProxyFiles.in_state_dir(config.superlink.state_dir)
    text = nginx_config(config.superlink, files, tls, nginx, relay_port=9700)
    assert "server 127.0.0.1:9700;" in text and "server 127.0.0.1:9600;" in text
    locations = text.split("        location ")[1:]
    relayed = {block.split(" {")[0]: block for block in locations if "proxy_pass http://fedpath_pull_relay;" in block}
    assert sorted(relayed) == ["= /v1/fleet/pull-messages", "= /v1/fleet/pull-object",
                               "= /v1/fleet/push-messages", "= /v1/fleet/push-object"]
    # only the relay's two push routes take large bodies; every other Fleet request is a few ids, and the
    # SuperLink reads a body whole before it checks who sent it
    limits = {block.split(" {")[0]: block.split("client_max_body_size ")[1].split(";")[0] for block in locations
              if "proxy_pass" in block}
    assert limits == {"= /v1/fleet/pull-messages": "1m", "= /v1/fleet/pull-object": "1m",
                      "= /v1/fleet/push-messages": f"{config.superlink.max_request_mb}m",
                      "= /v1/fleet/push-object": f"{config.superlink.max_request_mb}m", "/v1/fleet/": "1m"}
    for block in relayed.values():  # the raw-URI check and POST only, as for every Fleet route
        assert "if ($fedpath_fleet_route = 0) {\n                return 404;" in block
        assert "limit_except POST {\n                deny all;" in block
        assert "proxy_request_buffering off;" in block  # a model update streams through, as to the SuperLink
    for pull in ("= /v1/fleet/pull-messages", "= /v1/fleet/pull-object"):
        assert "proxy_read_timeout 80s;" in relayed[pull]  # hold_s (20) + 60
    assert text.count("proxy_pass") == 5 and text.count("proxy_pass https://fedpath_superlink;") == 1
    prepare_proxy(config.superlink, files, tls, relay_port=9700)  # and nginx accepts it


def test_insecure_config_is_the_same_proxy_without_tls(tmp_path, nginx):
    config = _config(tmp_path)
    text = nginx_config(config.superlink, ProxyFiles.in_state_dir(config.superlink.state_dir), None, nginx)
    assert "listen 127.0.0.1:9500;" in text and "proxy_pass http://fedpath_superlink;" in text
    assert "ssl" not in text and "location / {\n            return 404;" in text


@pytest.mark.parametrize("uri, passed", [
    ("/v1/fleet/pull-messages", True), ("/v1/fleet/push-object", True),
    ("/v1/control/list-runs", False), ("/v1/fleet/../control/list-runs", False),
    ("/v1/fleet/%2e%2e/control/list-runs", False), ("/v1/fleet//pull-messages", False),
    ("/v1/fleet/pull-messages?x=1", False), ("/V1/FLEET/pull-messages", False), ("/v1/fleet/", False),
])
def test_fleet_route_pattern(uri, passed):
    import re

    assert bool(re.match(FLEET_ROUTE, uri)) is passed


def test_prepared_config_is_private_and_checked_by_nginx(tmp_path, nginx):
    config = _config(tmp_path)
    tls = init_consortium(tmp_path / "certs", "fl.example")
    files = ProxyFiles.in_state_dir(config.superlink.state_dir)
    prepare_proxy(config.superlink, files, tls)
    assert stat.S_IMODE(files.conf.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.dir.stat().st_mode) == 0o700
    assert (files.temp / "body").is_dir()  # nginx -t made its temporary folders here, not under /var


def test_a_config_nginx_refuses_is_a_clear_error(tmp_path, nginx):
    config = _config(tmp_path, host="256.0.0.1")
    with pytest.raises(ProxyError, match=r"nginx refused the generated configuration .*nginx.conf:\n.*256\.0\.0\.1"):
        prepare_proxy(config.superlink, ProxyFiles.in_state_dir(config.superlink.state_dir), None)


def test_start_without_nginx_exits_2_saying_how_to_install_it(tmp_path, monkeypatch, capsys):
    config_path = tmp_path / "server.yaml"
    config_path.write_text(yaml.safe_dump({"classes": ["a", "b"], "superlink": {"port": free_port()}}))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(fleet_proxy, "SEARCH_PATH", ())
    try:  # detached: a start that went ahead regardless returns, and is stopped below
        assert server_main(["start", "--config", str(config_path), "--insecure", "--detach"]) == 2
        error = capsys.readouterr().err
        assert "nginx is not installed" in error and "apt-get install nginx-light" in error
        assert not (tmp_path / "state" / "superlink.pid").exists()  # nothing was started
    finally:
        stop_server(StatePaths(load_server_config(config_path)))


def test_connect_host_reaches_a_wildcard_bind_on_loopback():
    assert connect_host("0.0.0.0") == "127.0.0.1" and connect_host("") == "127.0.0.1"
    assert connect_host("::") == "::1"
    assert connect_host("10.1.2.3") == "10.1.2.3" and connect_host("fl.example") == "fl.example"
