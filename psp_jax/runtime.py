"""Process set-up for the entry points: TensorFlow quiet and off the accelerators, quiet logs.

TensorFlow only feeds the host (tf.data); JAX owns the accelerators. Every entry point
(train.py, the `python -m psp_jax.X` commands, the job functions train_and_evaluate and
evaluate, the test suite) calls `setup` before it builds a pipeline; nothing here happens
on import.
"""

import functools
import logging
import os

# Read by TensorFlow at its first import: both are needed to silence its start-up lines.
_TF_ENV = {'TF_CPP_MIN_LOG_LEVEL': '2', 'TF_ENABLE_ONEDNN_OPTS': '0'}
# Libraries whose INFO lines drown a run's own (orbax logs a dozen per checkpoint).
_CHATTY = ('/orbax/', '/tensorflow_datasets/', '/clu/')


def quiet_tensorflow_env() -> None:
  """Sets TensorFlow's logging variables, unless the user set them (before TF is imported)."""
  for key, value in _TF_ENV.items():
    os.environ.setdefault(key, value)


@functools.cache
def setup_tensorflow() -> None:
  """Imports TensorFlow quietly and hides every GPU and TPU from it (once per process).

  Without this, a full TensorFlow build (as on Colab) claims the GPU's memory when the first
  tf.data op runs, and JAX then has none.
  """
  quiet_tensorflow_env()
  import tensorflow as tf  # noqa: PLC0415 (the only optional import: predict runs without TF)

  for kind in ('GPU', 'TPU'):
    try:
      if tf.config.list_physical_devices(kind):
        tf.config.set_visible_devices([], kind)
    except RuntimeError:
      # TF initialised its devices before this call: too late to hide them.
      logging.warning('TensorFlow already uses the %s: call psp_jax.runtime.setup first.', kind)


class _QuietLibraries(logging.Filter):
  """Drops the INFO lines of orbax, TFDS and clu; keeps their warnings."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(s in record.pathname for s in _CHATTY)


def quiet_library_logs() -> None:
  """Installs _QuietLibraries on every handler of the root logger (absl's included)."""
  for handler in logging.getLogger().handlers:
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
      handler.addFilter(_QuietLibraries())


def setup(*, tensorflow: bool = True) -> None:
  """What every entry point does first.

  Args:
    tensorflow: also import and configure TensorFlow (False for commands that need no
      tf.data, such as predict, so they run where TensorFlow is not installed).
  """
  quiet_tensorflow_env()
  if tensorflow:
    setup_tensorflow()
  quiet_library_logs()
