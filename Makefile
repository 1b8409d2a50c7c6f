# Tenax developer entry points. `make demo` and `make test` install what they need.
SHELL := /bin/bash
PY_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test protos check-protos bench clean system-deps

# System packages the checks need (promtool for alert rules). Best effort when not root.
system-deps:
	@if ! command -v promtool >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing promtool (Debian prometheus package)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null \
	      && { systemctl stop prometheus 2>/dev/null || true; pkill -x prometheus 2>/dev/null || true; }; \
	  else echo "promtool missing: install Debian's 'prometheus' package" >&2; fi; \
	fi

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PY_SYS) -m venv $(VENV) || { \
	  echo "python3 -m venv failed; installing python3-venv" >&2; \
	  apt-get update -qq && apt-get install -y -qq python3-venv && $(PY_SYS) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch where there is no GPU (a local wheel here); pip's index otherwise.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) system-deps

demo: install
	$(VENV)/bin/tenax demo

# The import layering (.importlinter) first: a broken contract fails fast, before the long suite.
test: install
	$(VENV)/bin/lint-imports --no-cache --no-logo
	$(PY) -m pytest -q -p no:cacheprovider -m "not soak"
	$(PY) -m pytest -q -p no:cacheprovider -m soak

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/tenax.proto

check-protos: $(STAMP)
	$(PY) -m pytest -q tests/common/test_protos.py

bench: install
	$(PY) bench/trainer_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
