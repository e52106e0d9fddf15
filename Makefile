# Two entry points (README): `make demo` and `make test`. Both create .venv with uv when it is missing
# and install the locked dependency set (requirements.lock) plus this package in editable mode.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
UV := python3 -m uv
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONHASHSEED ?= 0

.PHONY: demo test install lock benchmark clean

$(STAMP): requirements.lock setup.cfg pyproject.toml
	@python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet 'uv>=0.4'
	@[ -x $(PY) ] || $(UV) venv -p 3.10 $(VENV)
	$(UV) pip install -p $(PY) -r requirements.lock
	$(UV) pip install -p $(PY) --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@run=runs/demo-$$(date +%Y%m%d-%H%M%S); set -e; \
	$(VENV)/bin/tfrec-recall train --dataset synthetic --epochs 5 --out $$run; \
	$(VENV)/bin/tfrec-recall recommend --model-dir $$run --user-id u0 --user-id u1 --k 10; \
	$(VENV)/bin/tfrec-recall export --model-dir $$run --index ivf --k 100 --export-dir-base $$run/export

test: $(STAMP)
	$(PY) -m pytest -q --timeout=900 -n 2 --dist loadfile --durations=30 tests

benchmark: $(STAMP)
	$(PY) benchmarks/quality.py

# Re-resolve the exact versions from requirements.in (needs the registry).
lock:
	$(UV) pip compile -p 3.10 requirements.in -o requirements.lock

clean:
	rm -rf $(VENV) runs .pytest_cache
