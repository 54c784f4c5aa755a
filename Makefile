# The README's two commands: `make train` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/synthetic
# Quiet TensorFlow's start-up lines (both variables are needed; see docs).
export TF_CPP_MIN_LOG_LEVEL := 2
export TF_ENABLE_ONEDNN_OPTS := 0

.PHONY: setup train test test-newest lint format clean

setup: $(VENV)/.installed

# torch==2.13.0 is installed first, on its own: it is a CPU build, and with it present
# the `[torch]` extra's range is already satisfied (a bare `torch` would pull CUDA wheels).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[data,torch,dev]'
	touch $@

train: setup
	$(PY) train.py --config configs/synthetic.py --workdir $(WORKDIR)

test: setup lint
	$(PY) -m pytest -n 2 --dist loadgroup

# The core tests (no torch) on Python 3.12 with the newest jax/flax/optax/orbax, in .venv312.
test-newest:
	.ci/py312.sh

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
