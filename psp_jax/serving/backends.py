"""Opens an artifact of any format as a runner.Runner: StableHLO by JAX, ONNX by
onnxruntime, a SavedModel by TensorFlow, each as a serving stack would run it."""

import os
from typing import Any

import numpy as np

from psp_jax import errors, runtime
from psp_jax.serving import contract, deps, runner


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """serving.json of an artifact folder.

  Raises:
    errors.NotFoundError: no such folder, or no serving.json in it.
    errors.UnreadableFileError: serving.json is not JSON or not of a known format.
  """
  if not os.path.isdir(path):
    raise errors.NotFoundError(
      f'--exported {path}: no such folder (python -m psp_jax.export --output names it).'
    )
  try:
    metadata = runner.read_metadata(path)
  except FileNotFoundError as e:
    raise errors.NotFoundError(f'--exported {e}') from e
  except ValueError as e:
    raise errors.UnreadableFileError(f'--exported {path}: {e}') from e
  if metadata.get('format') not in contract.FORMATS:
    raise errors.UnreadableFileError(
      f'--exported {path}: serving.json names format {metadata.get("format")!r}, not one of '
      f'{", ".join(contract.FORMATS)}.'
    )
  return metadata


def open_onnx(path: str | os.PathLike, metadata: dict[str, Any]) -> runner.Runner:
  """An ONNX artifact under onnxruntime's CPU provider."""
  import onnxruntime  # noqa: PLC0415 (optional: the `export` extra)

  session = onnxruntime.InferenceSession(
    os.path.join(os.fspath(path), metadata['file']), providers=['CPUExecutionProvider']
  )
  name = session.get_inputs()[0].name
  return runner.Runner(metadata, lambda images: session.run(None, {name: images})[0])


def open_savedmodel(path: str | os.PathLike, metadata: dict[str, Any]) -> runner.Runner:
  """A SavedModel artifact, its serving_default signature run by TensorFlow."""
  runtime.setup_tensorflow()
  import tensorflow as tf  # noqa: PLC0415 (optional: the `export` extra)

  loaded = tf.saved_model.load(os.fspath(path))
  signature = loaded.signatures['serving_default']
  key = metadata['output']['kind']

  def call(images: np.ndarray) -> np.ndarray:
    return signature(**{contract.INPUT_NAME: tf.constant(images)})[key].numpy()

  runner_ = runner.Runner(metadata, call)
  runner_.loaded = loaded  # The signature's variables live as long as the loaded object.
  return runner_


def open_artifact(path: str | os.PathLike) -> runner.Runner:
  """The Runner of an artifact folder written by python -m psp_jax.export, any format.

  Raises:
    errors.NotFoundError, errors.UnreadableFileError: not an artifact (read_metadata).
    deps.MissingDependencyError: the format's runtime is not installed.
  """
  metadata = read_metadata(path)
  fmt = metadata['format']
  deps.require(fmt, run=True)
  if fmt == 'stablehlo':
    return runner.Runner.stablehlo(path)
  if fmt == 'onnx':
    return open_onnx(path, metadata)
  return open_savedmodel(path, metadata)
