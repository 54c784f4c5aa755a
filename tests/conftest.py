"""Test set-up: 8 simulated CPU devices, quiet TensorFlow, TF kept off accelerators, and only
tests marked e2e may start processes."""

import contextlib
import multiprocessing
import os
import pathlib
import subprocess

# Both must be set before TensorFlow or JAX is imported (XLA_FLAGS is read by both).
_flag = '--xla_force_host_platform_device_count=8'
if _flag not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from psp_jax import runtime  # noqa: E402

runtime.setup()  # As every entry point does: TensorFlow quiet and off accelerators.


@pytest.fixture(scope='session')
def num_devices() -> int:
  return jax.device_count()


@pytest.fixture(scope='session')
def tpu_python() -> pathlib.Path:
  """.venv-tpu's python (jax[tpu], for TPU compiles); CI (CI=true, where `make test` creates
  it) fails without it, elsewhere the test is skipped with the command that makes it."""
  python = pathlib.Path(__file__).resolve().parents[1] / '.venv-tpu' / 'bin' / 'python'
  if not python.exists():
    message = f'{python} is missing: run `make preflight-setup`'
    if os.environ.get('CI') == 'true':
      pytest.fail(message)
    pytest.skip(message)
  return python


def pytest_configure(config):
  # pytest-xdist registers this marker; declared here too so `-p no:xdist` runs accept it.
  config.addinivalue_line('markers', 'xdist_group(name): tests that share one xdist worker')


class StartedAProcess(AssertionError):
  """A test not marked e2e started a process: mark it, so `make test-fast` leaves it out."""


def _refuse_processes(*args, **kwargs):
  raise StartedAProcess(
    'this test starts a process but is not marked e2e: add @pytest.mark.e2e (pyproject.toml '
    'lists the tiers)'
  )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
  with _processes_allowed(item):
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
  with _processes_allowed(item):
    return (yield)


@contextlib.contextmanager
def _processes_allowed(item):
  """Keeps the e2e marker true: outside e2e tests (and their fixtures' set-up) subprocess and
  multiprocessing refuse to start anything."""
  if item.get_closest_marker('e2e'):
    yield
    return
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(subprocess.Popen, '__init__', _refuse_processes)
    patch.setattr(multiprocessing.process.BaseProcess, 'start', _refuse_processes)
    yield
