"""An exported artifact, opened and run: any format as a runner.Runner, and as a Segmenter.

  seg = ExportedSegmenter.open('exported/onnx')   # any format python -m psp_jax.export wrote
  labels = seg.predict(image)
  seg.overlay(image, labels).save('overlay.png')

Each format runs as a serving stack would run it (StableHLO by JAX, ONNX by onnxruntime, a
SavedModel by TensorFlow), one pass at the artifact's size, each image letterboxed to it.
Design: docs/serving.md#export
"""

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from psp_jax import digests, errors, runtime, visualize
from psp_jax.inference.segmenter import Segmenter, as_rgb
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


class DamagedArtifactError(errors.UnreadableFileError):
  """An artifact whose files are not those export wrote, or that its runtime cannot load."""


def verify(path: str | os.PathLike, metadata: dict[str, Any]) -> None:
  """Checks an artifact's files against the digests export recorded in its serving.json.

  An artifact exported before digests existed passes, with one warning.

  Raises:
    DamagedArtifactError: naming the first file that is missing or differs.
  """
  recorded = metadata.get('digests')
  if recorded is None:
    logging.warning(
      '--exported %s: its serving.json records no digests (exported before psp-jax wrote '
      'them): its files are used unchecked.',
      path,
    )
    return
  files = recorded.get('files') if isinstance(recorded, dict) else None
  if not isinstance(files, dict) or not files or recorded.get('algorithm') != digests.ALGORITHM:
    what = "serving.json's digests are not a record export writes"
  else:
    found = digests.of_files(path, list(files))
    bad = sorted(name for name, digest in files.items() if found.get(name) != digest)
    if not bad:
      return
    what = f'{bad[0]} is missing' if bad[0] not in found else f'{bad[0]} differs from its digest'
  raise DamagedArtifactError(
    f'--exported {path}: {what} (serving.json records the digest of every file export '
    'wrote: one was truncated, altered or replaced since). Export it again '
    '(python -m psp_jax.export).'
  )


def _loading(path: str | os.PathLike, fmt: str, load: Callable[[], runner.Runner]) -> runner.Runner:
  """load(), with anything the runtime raises on a malformed file as one message."""
  try:
    return load()
  except (errors.UserError, ImportError):
    raise
  except Exception as e:
    lines = str(e).strip().splitlines()
    raise DamagedArtifactError(
      f'--exported {path}: the {fmt} model cannot be loaded ({type(e).__name__}'
      f'{": " + lines[0][:200] if lines else ""}). Export it again (python -m psp_jax.export).'
    ) from e


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
    try:
      return signature(**{contract.INPUT_NAME: tf.constant(images)})[key].numpy()
    except tf.errors.InvalidArgumentError as e:
      writer = metadata.get('versions', {}).get('jax', 'unknown')
      too_new = deps.stablehlo_too_new(str(e), os.fspath(path), writer)
      if too_new is None:
        raise
      raise too_new from e

  runner_ = runner.Runner(metadata, call)
  runner_.loaded = loaded  # The signature's variables live as long as the loaded object.
  return runner_


def open_artifact(path: str | os.PathLike) -> runner.Runner:
  """The Runner of an artifact folder written by python -m psp_jax.export, any format.

  Raises:
    errors.NotFoundError, errors.UnreadableFileError: not an artifact (read_metadata).
    DamagedArtifactError: its files are not those export wrote (verify), or its runtime
      cannot load them.
    deps.MissingDependencyError: the format's runtime is not installed.

  A SavedModel TensorFlow cannot read raises deps.IncompatibleRuntimeError when run.
  """
  metadata = read_metadata(path)
  fmt = metadata['format']
  deps.require(fmt, run=True)
  verify(path, metadata)
  if fmt == 'stablehlo':
    return _loading(path, fmt, lambda: runner.Runner.stablehlo(path))
  if fmt == 'onnx':
    return _loading(path, fmt, lambda: open_onnx(path, metadata))
  return _loading(path, fmt, lambda: open_savedmodel(path, metadata))


class ExportedSegmenter:
  """Segmenter's predict / colorize / overlay / save on an artifact's Runner.

  Attributes:
    runner: the artifact (psp_jax.serving.runner.Runner).
    num_classes, class_names, palette, dataset: from its serving.json.
    batch_size: images per predict_batch call of predict_files.
  """

  # The same PNGs and colours as the in-process Segmenter (they read only the attributes
  # above and the methods below).
  save = Segmenter.save
  colorize = Segmenter.colorize

  def __init__(self, opened: runner.Runner):
    self.runner = opened
    self.num_classes = opened.num_classes
    self.class_names = opened.class_names
    self.palette = opened.palette
    self.dataset = opened.metadata.get('dataset')
    self.batch_size = opened.batch or runner.DEFAULT_CHUNK

  @classmethod
  def open(cls, path: str | os.PathLike) -> 'ExportedSegmenter':
    """An artifact folder of any format (open_artifact)."""
    return cls(open_artifact(path))

  def predict(self, image) -> np.ndarray:
    """int32 [H, W] label map of an image at its own size."""
    return self.runner.predict(as_rgb(image))

  def predict_batch(self, images: Sequence) -> list[np.ndarray]:
    """predict for several images, the artifact's batch at a time."""
    return self.runner.predict_batch([as_rgb(image) for image in images])

  def overlay(self, image, labels: np.ndarray | None = None, alpha: float = 0.5) -> Image.Image:
    """The image blended with its (predicted) label colours, and a legend of the classes."""
    image = as_rgb(image)
    labels = self.predict(image) if labels is None else labels
    return visualize.overlay_with_legend(image, labels, self.palette, self.class_names, alpha=alpha)
