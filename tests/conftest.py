"""Test set-up: 8 simulated CPU devices, quiet TensorFlow, TF kept off accelerators."""

import os

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


def pytest_configure(config):
  # pytest-xdist registers this marker; declared here too so `-p no:xdist` runs accept it.
  config.addinivalue_line('markers', 'xdist_group(name): tests that share one xdist worker')
