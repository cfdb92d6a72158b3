# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedpath-installed
DEMO   ?= demo

.PHONY: install demo test bench clean-demo

# torch/torchvision first, with exact pins: pip takes them from this kind of machine's disk;
# left to the resolver, they would pull several GB from the network.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/fedpath-sim demo --out $(DEMO)

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m benchmarks all

clean-demo:
	rm -rf $(DEMO)
