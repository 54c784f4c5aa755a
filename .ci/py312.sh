#!/usr/bin/env bash
# CI leg: the fast tier (no torch) on Python 3.12 with the newest jax, flax, optax and
# orbax-checkpoint, the releases Colab runs, so an API change there fails here first. The
# whole suite runs once, in `make test`; here the fast tier (`make test-fast`'s markers) keeps
# .ci/run under 45 minutes.
#
#   .ci/py312.sh                 # creates or upgrades .venv312, then runs the tests
#   .ci/py312.sh -k notebook     # extra arguments go to pytest
#
# PYTHON312=/path/to/python3.12 picks the interpreter; otherwise python3.12 on PATH, then
# the newest 3.12 under pyenv. VENV312 names the environment (default .venv312).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV312:-.venv312}
PY=$VENV/bin/python
export TF_CPP_MIN_LOG_LEVEL=2 TF_ENABLE_ONEDNN_OPTS=0

find_python312() {
  if [[ -n ${PYTHON312:-} ]]; then
    echo "$PYTHON312"
    return
  fi
  # A pyenv shim exists even when 3.12 is not selected, and then fails: run it to be sure.
  if command -v python3.12 >/dev/null && python3.12 -c '' 2>/dev/null; then
    command -v python3.12
    return
  fi
  local root candidate
  root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
  candidate=$(ls -d "$root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -n 1)
  if [[ -n $candidate ]]; then
    echo "$candidate"
    return
  fi
  echo 'py312: no Python 3.12 found (python3.12 on PATH, pyenv versions 3.12.*);' \
    'install one (pyenv install 3.12) or set PYTHON312=/path/to/python3.12' >&2
  return 1
}

start=$SECONDS
if [[ ! -x $PY ]]; then
  python312=$(find_python312)
  echo "py312: creating $VENV with $python312 ($("$python312" --version))"
  "$python312" -m venv "$VENV"
fi
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 12), sys.version' \
  || { echo "py312: $VENV is not a Python 3.12 environment; delete it" >&2; exit 1; }
"$PY" -m pip install --quiet --upgrade pip
# --upgrade on the named packages only (pip's only-if-needed strategy): the newest
# jax (with its jaxlib), flax, optax and orbax-checkpoint, every time this runs.
"$PY" -m pip install --quiet --upgrade -e '.[data,dev]' jax flax optax orbax-checkpoint
if "$PY" -c 'import torch' 2>/dev/null; then
  echo "py312: torch is installed in $VENV; this leg tests the package without it" >&2
  exit 1
fi
"$PY" - <<'EOF'
import importlib.metadata as m, sys
names = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow-cpu', 'numpy')
print('py312: Python', sys.version.split()[0], *(f'{n} {m.version(n)}' for n in names))
EOF
echo "py312: environment ready in $((SECONDS - start)) s"

tests=$SECONDS
"$PY" -m pytest -n 2 --dist loadscope -m 'not torch and not slow and not e2e and not network' "$@"
echo "py312: tests took $((SECONDS - tests)) s; the whole leg $((SECONDS - start)) s"
