"""The optional packages each export format needs, and one message when one is missing.

They are the `export` extra of pyproject.toml; nothing else in psp_jax imports them, so
the package (training, evaluation, predict) works without them.
"""

import importlib
import re

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


class IncompatibleRuntimeError(errors.UserError):
  """The installed runtime cannot run what a newer converter wrote (e.g. TF vs jax)."""


# TensorFlow's XlaCallModule names both StableHLO versions when it cannot read a program:
# "... in bytecode version 6 produced by: StableHLO_v1.18.0 ... failed to deserialize
# portable artifact using StableHLO_v1.13.7". jax.export writes the newest version its
# compatibility window allows, which a TensorFlow released earlier may not read.
_PRODUCED = re.compile(r'produced by: StableHLO_v([\w.]+)')
_READER = re.compile(r'failed to deserialize portable artifact using StableHLO_v([\w.]+)')
# The newest pair the export tests pass with (.venv on 2026-12-03).
CHECKED_PAIR = 'jax==0.10.2 with tensorflow-cpu==2.21.0'


def stablehlo_too_new(
  message: str, where: str, writer_jax: str, after: str = ''
) -> IncompatibleRuntimeError | None:
  """The one message for TensorFlow's 'cannot deserialize' error, or None for other errors.

  Args:
    message: TensorFlow's error text.
    where: what is at fault (an artifact folder, or '--format savedmodel').
    writer_jax: the jax version that wrote the program (serving.json's versions).
    after: a last sentence (what was or was not written).
  """
  produced, reader = _PRODUCED.search(message), _READER.search(message)
  if not produced or not reader:
    return None
  import tensorflow as tf  # noqa: PLC0415 (optional: the `export` extra; loaded by the caller)

  return IncompatibleRuntimeError(
    f'{where}: its program is StableHLO v{produced.group(1)} (written by jax {writer_jax}), '
    f'which TensorFlow {tf.__version__} cannot run: it reads StableHLO up to '
    f'v{reader.group(1)}. Use a TensorFlow as new as that jax, or export the SavedModel '
    f'where jax is no newer than TensorFlow ({CHECKED_PAIR} works); --format stablehlo '
    f'and --format onnx do not depend on TensorFlow.{after}'
  )
