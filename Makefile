# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedpath-installed
DEMO   ?= demo

.PHONY: install nginx demo lint test bench clean-demo

# torch/torchvision first, with exact pins: pip takes them from this kind of machine's disk;
# left to the resolver, they would pull several GB from the network.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) nginx

# The SuperLink's public port is an nginx proxy (server/fleet_proxy.py, docs/control-plane.md):
# Debian's nginx-light, installed here when we are root and it is missing. Not being able to is
# a message, not a failure: `fedpath-server start` and the tests that need nginx say so clearly.
# Debian may start its own nginx (port 80) after installing it; fedpath does not use that one.
NGINX_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx-light
nginx:
	@if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "NOTE: nginx is missing; fedpath-server start needs it (the proxy in front of the SuperLink)."; \
	  echo "      Install it as root: apt-get install nginx-light (elsewhere: the distribution's nginx)."; \
	elif $(NGINX_INSTALL) >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && $(NGINX_INSTALL) >/dev/null 2>&1; }; then \
	  echo "installed nginx-light (the proxy in front of the SuperLink). If Debian started its default"; \
	  echo "site on port 80, fedpath does not need it: systemctl disable --now nginx"; \
	else \
	  echo "NOTE: could not install nginx-light with apt-get; fedpath-server start needs it."; \
	  echo "      Run as root: apt-get update && apt-get install nginx-light"; \
	fi

demo: install
	$(VENV)/bin/fedpath-sim demo --out $(DEMO)

lint: install
	$(VENV)/bin/ruff check .

# Three pytest processes on two cores: most of the slow tests wait on real servers (polls, TLS
# handshakes, a SuperNode's 3 s sleep), not on the CPU. --dist loadfile keeps a module's tests, and
# the consortium they may share, in one process. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 3
test: install
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

bench: install
	$(PY) -m benchmarks all

clean-demo:
	rm -rf $(DEMO)
