# The README's two commands: `make train` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/synthetic
# The TPU pre-flight's own venv: with libtpu (jax[tpu]) installed, JAX probes for a TPU at
# start-up and psp_jax.distributed.cpu_only() skips the CPU XLA flags, so it stays out of .venv.
TPU_VENV ?= .venv-tpu
TPU_PY := $(TPU_VENV)/bin/python
CONFIG ?= configs/ade20k.py
TOPOLOGY ?= v5e:2x4
# Quiet TensorFlow's start-up lines (both variables are needed: psp_jax/runtime.py).
export TF_CPP_MIN_LOG_LEVEL := 2
export TF_ENABLE_ONEDNN_OPTS := 0

.PHONY: setup train test test-fast test-newest lint format clean preflight-setup preflight

setup: $(VENV)/.installed

# torch==2.13.0 is installed first, on its own: it is a CPU build, and with it present
# the `[torch]` extra's range is already satisfied (a bare `torch` would pull CUDA wheels).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[data,torch,dev,export]'
	touch $@

train: setup
	$(PY) train.py --config configs/synthetic.py --workdir $(WORKDIR)

test: setup preflight-setup lint
	$(PY) -m pytest -n 2 --dist loadgroup

# The tier to iterate on: no process started (`e2e`), no registry (`network`), no full-size
# network or TPU compile (`slow`); pyproject.toml defines the markers. Needs no .venv-tpu.
FAST := not slow and not e2e and not network
# --dist loadscope: a module's tests share one worker, so its module fixtures are built once.
test-fast: setup lint
	$(PY) -m pytest -n 2 --dist loadscope -m "$(FAST)"

# Only the project's core dependencies and jax[tpu] (no data/torch/dev extras): the cheapest
# install that compiles the train and eval steps for TPU (tests/test_preflight.py runs it).
preflight-setup: $(TPU_VENV)/.installed

$(TPU_VENV)/.installed: pyproject.toml
	test -x $(TPU_PY) || $(PYTHON) -m venv $(TPU_VENV)
	$(TPU_PY) -m pip install --quiet -e '.[tpu]'
	touch $@

# Does CONFIG fit a TOPOLOGY slice, and how fast at best? e.g.
#   make preflight CONFIG=configs/ade20k.py TOPOLOGY=v5e:2x4 ARGS='--config.batch_size=32'
preflight: preflight-setup
	$(TPU_PY) -m psp_jax.preflight --config $(CONFIG) --topology $(TOPOLOGY) $(ARGS)

# The fast tier (no torch) on Python 3.12 with the newest jax/flax/optax/orbax, in .venv312.
test-newest:
	.ci/py312.sh

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) $(TPU_VENV) .pytest_cache .ruff_cache
