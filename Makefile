# Every target that needs the package depends on .venv/installed, so `make demo` and
# `make test` are each the only command a new machine needs.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install demo agent-demo agent-demo-crafter test lint format bench clean chromium

install: $(VENV)/installed

# torch/torchvision come first and pinned: pip takes them from this machine's disk
# (a later resolver pass for transformers/peft then finds them already satisfied).
$(VENV)/installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev]'
	touch $@

demo: install
	$(PY) examples/digits/run_demo.py

# collect -> filter -> train -> serve -> collect again, on the built-in lamp task
agent-demo: install
	$(PY) examples/agent/run_demo.py

# the same commands on Crafter (the crafter extra is in dev, so `make install` has it)
agent-demo-crafter: install
	$(PY) examples/agent/run_crafter.py

# The official Fireworks training client, for the tests that drive it against vlmtune
# (tests/server/test_fireworks_client.py). It pins pydantic<2.13, below vlmtune's, so it
# lives in its own --target folder, put on PYTHONPATH only in the client's subprocess.
# Built once; `make clean` removes it.
FIREWORKS_CLIENT := .cache/fireworks-client
FIREWORKS_PINS := fireworks-ai==1.2.30 pydantic==2.12.5 pydantic-core==2.41.5 pyqwest==0.10.0

$(FIREWORKS_CLIENT)/installed: | $(VENV)/installed
	rm -rf $(FIREWORKS_CLIENT)
	$(PIP) install -q --no-deps --target $(FIREWORKS_CLIENT) $(FIREWORKS_PINS)
	touch $@

# Chromium from the system's packages, for the report's browser test
# (tests/report/test_report_browser.py: playwright drives it and downloads no browser).
# apt-get as root in CI, through sudo elsewhere; without apt-get, install it yourself
# (the browser test skips when there is none).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    $(SUDO) apt-get update -qq && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "chromium: no apt-get here; install Chromium (the browser test skips)"; fi; }

# Two workers (pytest-xdist): much of the suite waits on subprocesses and servers, so two
# workers on two cores take 7.6 min where one takes 10.
test: install $(FIREWORKS_CLIENT)/installed chromium
	$(PY) -m pytest -q -x -n 2 --dist loadgroup --durations=15

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	# tests/sdk/test_protocol.py holds the static check that both transports implement
	# the client protocols, member for member.
	$(VENV)/bin/mypy src tests/sdk/test_protocol.py

format: install
	$(VENV)/bin/ruff check --fix src tests benchmarks examples
	$(VENV)/bin/ruff format src tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache $(FIREWORKS_CLIENT)
