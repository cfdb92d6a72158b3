# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedpath-installed
DEMO   ?= demo

.PHONY: install nginx turbojpeg browser ssh-keygen demo lint test bench clean-demo

# torch/torchvision first, with exact pins: pip takes them from this kind of machine's disk;
# left to the resolver, they would pull several GB from the network.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) nginx turbojpeg browser ssh-keygen

# Debian packages fedpath or its tests need, installed when we are root and they are missing. Not being
# able to is a message, not a failure: the command or test that needs one says so clearly (tests fail,
# never skip). $(call os_package,PRESENT-CHECK,PACKAGES,WHO NEEDS THEM AND WHY)
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
define os_package
	@if $(1); then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
	  echo "NOTE: $(2) missing; $(3)."; \
	  echo "      Install as root: apt-get install $(2) (elsewhere: the distribution's equivalent)."; \
	elif $(APT_INSTALL) $(2) >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && $(APT_INSTALL) $(2) >/dev/null 2>&1; }; then \
	  echo "installed $(2): $(3)"; \
	else \
	  echo "NOTE: could not install $(2) with apt-get; $(3). Run as root: apt-get update && apt-get install $(2)"; \
	fi
endef

# The SuperLink's public port is an nginx proxy (server/fleet_proxy.py, docs/control-plane.md).
# Debian may start its own nginx (port 80) after installing it; fedpath does not use that one
# (systemctl disable --now nginx).
nginx:
	$(call os_package,command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ],nginx-light,fedpath-server start needs it (the proxy in front of the SuperLink))

# tests/test_dicom.py converts a real SVS with wsidicomizer, whose opentile needs libjpeg-turbo's shared
# library; fedpath itself reads DICOM through OpenSlide.
turbojpeg:
	$(call os_package,ldconfig -p 2>/dev/null | grep -q 'libturbojpeg\.so',libturbojpeg0,tests/test_dicom.py needs it to make DICOM slides)

# tests/test_dashboard.py drives the dashboard in a real headless browser (Selenium, a dev dependency,
# downloads nothing when given both paths).
browser:
	$(call os_package,[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ],chromium chromium-driver,tests/test_dashboard.py drives the dashboard with them)

# tests/test_site_keys.py checks fedpath's key fingerprints against OpenSSH's own (what an admin compares
# on the phone with the hospital).
ssh-keygen:
	$(call os_package,command -v ssh-keygen >/dev/null 2>&1,openssh-client,tests/test_site_keys.py compares fingerprints with ssh-keygen)

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
