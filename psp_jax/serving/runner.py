"""Runs an exported PSPNet (python -m psp_jax.export) on images of any size, without psp_jax.

Imports only json, os, NumPy and (for StableHLO) JAX: `export` copies this file into every
StableHLO artifact (run_stablehlo.py). Images of other sizes are letterboxed.

  runner = Runner.stablehlo('exported/stablehlo')  # the folder `export --output` wrote
  labels = runner.predict(image)                   # uint8 RGB [h, w, 3] -> int32 [h, w]

Design: docs/serving.md#letterbox (in the psp-jax repository)
"""

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

METADATA_FILE = 'serving.json'
STABLEHLO_FILE = 'model.stablehlo'
# Images per call of a dynamic-batch artifact in predict_batch.
DEFAULT_CHUNK = 8


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """serving.json of an artifact folder (what export wrote), as a dict.

  Raises:
    FileNotFoundError: path has no serving.json (not an artifact written by export).
    ValueError: serving.json is not JSON.
  """
  file = os.path.join(os.fspath(path), METADATA_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(
      f'{path} is not an exported model: it has no {METADATA_FILE} (python -m psp_jax.export '
      'writes one).'
    )
  with open(file) as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ValueError(f'{file} is not JSON: {e}') from e


def linear_indices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source rows and weights of a bilinear resize along one axis (cv2 INTER_LINEAR).

  The rule of psp_jax.inference.planning.linear_indices (pixel centres at +0.5, clamped at the
  borders, no antialiasing), repeated here so this file needs no psp_jax.

  Returns:
    i0, i1: int [out_size] source indices; frac: float32 [out_size], out = (1-f) i0 + f i1.
  """
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  src = np.clip(src, 0.0, in_size - 1)
  i0 = np.floor(src).astype(np.int64)
  frac = (src - i0).astype(np.float32)
  return i0, np.minimum(i0 + 1, in_size - 1), frac


def resize_bilinear(array: np.ndarray, height: int, width: int) -> np.ndarray:
  """float32 [height, width, C] of a [h, w, C] array, bilinear (columns first, as cv2)."""
  array = np.asarray(array, np.float32)
  if array.shape[:2] == (height, width):
    return array
  c0, c1, cf = linear_indices(array.shape[1], width)
  array = array[:, c0] * (1 - cf)[None, :, None] + array[:, c1] * cf[None, :, None]
  r0, r1, rf = linear_indices(array.shape[0], height)
  return array[r0] * (1 - rf)[:, None, None] + array[r1] * rf[:, None, None]


def resize_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
  """[height, width] of a label map [h, w]: each output pixel takes the one under its centre."""
  rows = np.minimum(
    ((np.arange(height) + 0.5) * labels.shape[0] / height).astype(np.int64), labels.shape[0] - 1
  )
  cols = np.minimum(
    ((np.arange(width) + 0.5) * labels.shape[1] / width).astype(np.int64), labels.shape[1] - 1
  )
  return labels[rows[:, None], cols[None, :]]


def letterbox(height: int, width: int, size: Sequence[int]) -> tuple[int, int, int, int]:
  """Where an image of height x width sits on an artifact's canvas.

  Args:
    height, width: the image's size.
    size: the artifact's (H, W).

  Returns:
    (top, left, new_height, new_width): the image scaled by min(H / height, W / width),
    aspect kept, centred (the mean padding is split int(pad / 2) above / left, as in
    tool/test.py).
  """
  canvas_h, canvas_w = int(size[0]), int(size[1])
  scale = min(canvas_h / height, canvas_w / width)
  new_h = min(canvas_h, max(1, round(height * scale)))
  new_w = min(canvas_w, max(1, round(width * scale)))
  return (canvas_h - new_h) // 2, (canvas_w - new_w) // 2, new_h, new_w


class Runner:
  """An exported PSPNet and its contract (serving.json): batches, letterboxing, label maps.

  Attributes:
    metadata: serving.json.
    size: the artifact's (H, W).
    batch: its fixed batch size, or None (any batch).
    output: 'labels', 'logits' or 'probs', what the artifact returns.
    class_names, palette: the data set's names and colours (uint8 [K, 3]).
  """

  def __init__(self, metadata: dict[str, Any], call: Callable[[np.ndarray], np.ndarray]):
    """call(uint8 [B, H, W, 3]) -> the artifact's output for that batch (NumPy)."""
    self.metadata = metadata
    self.call = call
    self.size = tuple(int(s) for s in metadata['input']['size'])
    batch = metadata['input']['batch']
    self.batch = None if batch == 'dynamic' else int(batch)
    self.output = metadata['output']['kind']
    self.num_classes = int(metadata['num_classes'])
    self.class_names = tuple(metadata['class_names'])
    self.palette = np.asarray(metadata['palette'], np.uint8).reshape(-1, 3)
    self.fill = np.asarray(metadata['preprocessing']['pad_value'], np.uint8)

  @classmethod
  def stablehlo(cls, path: str | os.PathLike) -> 'Runner':
    """A StableHLO artifact folder, run by jax.export (jax and flatbuffers, no psp_jax)."""
    import jax  # noqa: PLC0415 (only this format needs JAX; the rest of this file is NumPy)

    metadata = read_metadata(path)
    if metadata['format'] != 'stablehlo':
      raise ValueError(f'{path} holds a {metadata["format"]} model, not StableHLO.')
    with open(os.path.join(os.fspath(path), metadata['file']), 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    return cls(metadata, lambda images: np.asarray(exported.call(images)))

  def run(self, images: np.ndarray) -> np.ndarray:
    """The artifact's output for uint8 [N, H, W, 3] images of its size, any N.

    A fixed-batch artifact is called on chunks of its batch, the last one padded with
    black images whose outputs are dropped.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != (*self.size, 3):
      raise ValueError(
        f'expected uint8 images [N, {self.size[0]}, {self.size[1]}, 3], got {images.dtype} '
        f'{images.shape}: use predict for other sizes.'
      )
    step = self.batch or max(1, len(images))
    outs = []
    for start in range(0, len(images), step):
      chunk = images[start : start + step]
      missing = step - len(chunk) if self.batch else 0
      if missing:
        chunk = np.concatenate([chunk, np.zeros((missing, *chunk.shape[1:]), np.uint8)])
      outs.append(np.asarray(self.call(chunk))[: len(chunk) - missing])
    return np.concatenate(outs)

  def canvas(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """uint8 [H, W, 3] canvas of an RGB image of any size, and letterbox()'s placement."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f'expected an RGB image [h, w, 3], got shape {image.shape}')
    top, left, new_h, new_w = box = letterbox(*image.shape[:2], self.size)
    if (new_h, new_w) == image.shape[:2] and image.dtype == np.uint8:
      resized = image
    else:
      resized = resize_bilinear(image, new_h, new_w)
      resized = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    canvas = np.empty((*self.size, 3), np.uint8)
    canvas[...] = self.fill
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas, box

  def labels_at(self, output: np.ndarray, box: tuple[int, int, int, int], height: int, width: int):
    """int32 [height, width] labels of one image from its output on the canvas."""
    top, left, new_h, new_w = box
    crop = output[top : top + new_h, left : left + new_w]
    if self.output == 'labels':
      return resize_nearest(crop, height, width).astype(np.int32)
    # Scores are resized before the argmax, as tool/test.py resizes probabilities.
    return np.argmax(resize_bilinear(crop, height, width), axis=-1).astype(np.int32)

  def predict_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """int32 [h, w] label maps of RGB images [h, w, 3] (uint8, or floats on 0..255)."""
    out = []
    step = self.batch or DEFAULT_CHUNK
    for start in range(0, len(images), step):
      chunk = [np.asarray(image) for image in images[start : start + step]]
      canvases, boxes = zip(*(self.canvas(image) for image in chunk), strict=True)
      outputs = self.run(np.stack(canvases))
      for image, output, box in zip(chunk, outputs, boxes, strict=True):
        out.append(self.labels_at(output, box, *image.shape[:2]))
    return out

  def predict(self, image: np.ndarray) -> np.ndarray:
    """int32 [h, w] label map of one RGB image [h, w, 3]."""
    return self.predict_batch([image])[0]


def main(argv: Sequence[str]) -> None:
  """python run_stablehlo.py ARTIFACT_DIR IMAGES.npy LABELS.npy (uint8 [N, h, w, 3])."""
  if len(argv) != 4:
    raise SystemExit(f'usage: python {os.path.basename(argv[0])} ARTIFACT_DIR IN.npy OUT.npy')
  runner = Runner.stablehlo(argv[1])
  images = np.load(argv[2])
  images = images[None] if images.ndim == 3 else images
  np.save(argv[3], np.stack(runner.predict_batch(list(images))))


if __name__ == '__main__':
  import sys

  main(sys.argv)
