"""The optional packages each export format needs, and one message when one is missing.

They are the `export` extra of pyproject.toml; nothing else in psp_jax imports them, so
the package (training, evaluation, predict) works without them.
"""

import importlib

from psp_jax import errors, runtime

INSTALL_HINT = "pip install 'psp-jax[export]' (in a clone: pip install -e '.[export]')"
# format -> (module, why) to write an artifact; RUN: those to run one.
WRITE = {
  'stablehlo': (('flatbuffers', 'jax.export serialises with it; jax does not declare it'),),
  'savedmodel': (('tensorflow', 'jax2tf and tf.saved_model write the SavedModel'),),
  'onnx': (
    ('jax2onnx', 'it converts the JAX program to ONNX'),
    ('onnx', 'the ONNX file format'),
    ('onnxruntime', 'the parity check runs the file under it'),
  ),
}
RUN = {
  'stablehlo': (('flatbuffers', 'jax.export reads the artifact with it'),),
  'savedmodel': (('tensorflow', 'TensorFlow runs the SavedModel'),),
  'onnx': (('onnxruntime', 'onnxruntime runs the ONNX file'),),
}


class MissingDependencyError(errors.UserError, ImportError):
  """An optional package a format needs is not installed (an ImportError for callers)."""


def require(fmt: str, *, run: bool = False) -> None:
  """Imports the packages `fmt` needs, or raises one message naming the extra.

  Args:
    fmt: 'stablehlo', 'savedmodel' or 'onnx'.
    run: only what running an artifact needs (not converting one).

  Raises:
    MissingDependencyError: naming the package, why it is needed and how to install it.
  """
  runtime.quiet_tensorflow_env()  # TensorFlow may be among them: quiet from its first import.
  for module, why in (RUN if run else WRITE)[fmt]:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise MissingDependencyError(
        f'--format {fmt} needs the {module} package ({why}), which cannot be imported '
        f'({e}): {INSTALL_HINT}.'
      ) from e
