"""The one place TensorFlow is imported: quiet, and kept off every accelerator.

Import it as `from psp_jax.data._tf import tf`. tf.data only feeds the host; JAX owns the
accelerators, so TF must never claim (or pre-allocate memory on) a GPU or TPU.
"""

import logging
import os

# Both must be set before the first `import tensorflow`; either alone leaves start-up lines.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import tensorflow as tf  # noqa: E402


def _hide_accelerators() -> None:
  """Hides GPUs and TPUs from TF (before TF initialises its devices)."""
  for kind in ('GPU', 'TPU'):
    try:
      if not tf.config.list_physical_devices(kind):
        continue
      tf.config.set_visible_devices([], kind)
    except RuntimeError:
      # TF's devices were initialised before this module was imported.
      logging.warning('TensorFlow already uses the %s; import psp_jax.data first.', kind)


_hide_accelerators()

__all__ = ['tf']
