"""An exported model where predict wants a Segmenter: label maps, colours, overlays, PNGs.

  seg = ExportedSegmenter.open('exported/onnx')   # any format python -m psp_jax.export wrote
  labels = seg.predict(image)
  seg.overlay(image, labels).save('overlay.png')

`python -m psp_jax.predict --exported DIR` runs it. The procedure is the artifact's, not the
official test's: one pass at the artifact's fixed size, each image letterboxed to it
(psp_jax.serving.runner), no sliding window, flip or scales.
"""

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from psp_jax import visualize
from psp_jax.inference.segmenter import Segmenter, as_rgb
from psp_jax.serving import backends, runner


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

  def __init__(self, artifact: runner.Runner):
    self.runner = artifact
    self.num_classes = artifact.num_classes
    self.class_names = artifact.class_names
    self.palette = artifact.palette
    self.dataset = artifact.metadata.get('dataset')
    self.batch_size = artifact.batch or runner.DEFAULT_CHUNK

  @classmethod
  def open(cls, path: str | os.PathLike) -> 'ExportedSegmenter':
    """An artifact folder of any format (psp_jax.serving.backends.open_artifact)."""
    return cls(backends.open_artifact(path))

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
