# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedpath-installed
DEMO   ?= demo

.PHONY: install nginx turbojpeg browser demo lint test bench clean-demo

# torch/torchvision first, with exact pins: pip takes them from this kind of machine's disk;
# left to the resolver, they would pull several GB from the network.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) nginx turbojpeg browser

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

# The DICOM tests (tests/test_dicom.py) convert a real SVS with wsidicomizer, whose opentile needs
# libjpeg-turbo's shared library (Debian: libturbojpeg0); fedpath itself reads DICOM through OpenSlide.
TURBOJPEG_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libturbojpeg0
turbojpeg:
	@if ldconfig -p 2>/dev/null | grep -q 'libturbojpeg\.so'; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "NOTE: libturbojpeg is missing; tests/test_dicom.py needs it to make DICOM slides (wsidicomizer)."; \
	  echo "      Install it as root: apt-get install libturbojpeg0 (elsewhere: the distribution's libjpeg-turbo)."; \
	elif $(TURBOJPEG_INSTALL) >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && $(TURBOJPEG_INSTALL) >/dev/null 2>&1; }; then \
	  echo "installed libturbojpeg0 (tests/test_dicom.py converts a slide to DICOM with it)"; \
	else \
	  echo "NOTE: could not install libturbojpeg0 with apt-get; tests/test_dicom.py needs it."; \
	fi

# tests/test_dashboard.py drives the dashboard in a real headless browser: Debian's chromium and
# chromedriver (Selenium is a dev dependency; it downloads nothing when given both paths).
BROWSER_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "NOTE: chromium or chromedriver is missing; tests/test_dashboard.py needs both (a real browser)."; \
	  echo "      Install them as root: apt-get install chromium chromium-driver"; \
	elif $(BROWSER_INSTALL) >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && $(BROWSER_INSTALL) >/dev/null 2>&1; }; then \
	  echo "installed chromium and chromium-driver (tests/test_dashboard.py drives the dashboard with them)"; \
	else \
	  echo "NOTE: could not install chromium chromium-driver with apt-get; tests/test_dashboard.py needs them."; \
	fi

demo: install
	$(VENV)/bin/fedpath-sim demo --out $(DEMO)

lint: install
	$(VENV)/bin/ruff check .

# Three pytest processes on two cores: most of the slow tests wait on real servers (polls, TLS
# handshakes, a SuperNode's 3 s sleep), not on the CPU. --dist loadfile keeps a module's tests, and
# the consortium they may share, in one process; --no-loadscope-reorder hands files out in the order
# tests/conftest.py sorts them (longest first) instead of by their number of tests, which put the
# few-test, five-minute consortium files last. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 3
test: install
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

bench: install
	$(PY) -m benchmarks all

clean-demo:
	rm -rf $(DEMO)
