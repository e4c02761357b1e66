# Two commands on a fresh Debian/Ubuntu machine with Python 3.11+:
#   make demo   sets everything up and runs the demo of the whole stack
#   make test   sets everything up and runs the whole test suite
# apt packages are installed when run as root or with passwordless sudo; otherwise the embedded
# amqtt broker stands in for Mosquitto (demo only; the tests need the real servers).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
APT_PACKAGES := mosquitto mosquitto-clients influxdb victoria-metrics docker-compose
SUDO := $(shell if [ "$$(id -u)" = 0 ]; then echo ""; elif sudo -n true 2>/dev/null; then echo sudo; else echo none; fi)

.PHONY: setup system-packages venv specs demo test lint bench clean

setup: system-packages venv specs

# The official AsyncAPI 3 JSON Schema (npm package @asyncapi/specs) validates docs/asyncapi.yaml in tests.
ASYNCAPI_SPECS := $(VENV)/npm/node_modules/@asyncapi/specs/schemas/3.0.0-without-$$id.json
specs: venv
	@if [ ! -f '$(ASYNCAPI_SPECS)' ] && command -v npm >/dev/null; then \
	  npm install --silent --no-audit --no-fund --prefix $(VENV)/npm @asyncapi/specs@6 >/dev/null || \
	  echo "note: could not install @asyncapi/specs; the AsyncAPI schema test will be skipped"; fi

system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$(SUDO)" = none ]; then \
	  echo "note: cannot install$$missing (not root, no sudo); the demo falls back to the embedded broker"; \
	elif command -v apt-get >/dev/null; then \
	  echo "installing$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	else echo "note: no apt-get; install$$missing yourself"; fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $@

venv: $(VENV)/.installed

demo: setup
	$(VENV)/bin/forgeline demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
