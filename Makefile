# Every target that needs the package depends on .venv/installed, so `make demo` and
# `make test` are each the only command a new machine needs.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install demo test lint format bench clean

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

# Two workers (pytest-xdist): much of the suite waits on subprocesses and servers, so two
# workers on two cores take 7.6 min where one takes 10.
test: install
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
	rm -rf $(VENV) runs .pytest_cache
