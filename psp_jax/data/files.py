"""Validated reading of image and label files, shared by the builders and the file sources.

Images become uint8 [H, W, 3] RGB whatever their mode; labels become class indices through a
256-entry lookup table that marks invalid raw values, so a bad file fails with its name and
its bad values. Design: docs/design.md#decoding-with-tensorflow-ops
"""

import io
import logging
import threading
import warnings
from collections.abc import Mapping

import numpy as np
from PIL import Image

from psp_jax import errors

# util/dataset.py's list less .ppm and .pgm, which TensorFlow cannot decode (decode.py).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
NETPBM_EXTENSIONS = ('.ppm', '.pgm')
INVALID = -1  # Lookup-table entry of a raw label value that must not occur.


class BadExampleError(errors.UserError, ValueError):
  """An image or label file that cannot be used (unreadable, wrong size, bad values)."""


def label_table(mapping: Mapping[int, int] | None = None, *, num_classes: int = 0) -> np.ndarray:
  """A raw-value -> class lookup table.

  Args:
    mapping: raw value -> class (or 255); values not in it are invalid. None gives the
      identity on [0, num_classes) plus 255 -> 255 (labels used as they are).
    num_classes: for mapping None.

  Returns:
    int16 [256] with INVALID for values that must not occur.
  """
  table = np.full(256, INVALID, np.int16)
  if mapping is None:
    table[:num_classes] = np.arange(num_classes)
    table[255] = 255
  else:
    for raw, cls in mapping.items():
      table[raw] = cls
  return table


def _open(data: bytes, name: str, what: str) -> Image.Image:
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
      image.load()  # Decodes now: a truncated or corrupt file fails here, not later.
  except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ... for bad files.
    raise BadExampleError(f'{name}: cannot read the {what} ({type(e).__name__}: {e}).') from e
  return image


def decode_image(data: bytes, name: str) -> np.ndarray:
  """Decodes an image file's bytes to RGB.

  Grayscale and palette images are expanded to RGB, an alpha channel is dropped and 16-bit
  images keep their high byte, as cv2.imread(path, cv2.IMREAD_COLOR) does in the original
  util/dataset.py.

  Args:
    data: the file's bytes.
    name: file name for error messages.

  Returns:
    uint8 [H, W, 3].
  """
  image = _open(data, name, 'image')
  if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
    # cv2 scales 16-bit images to 8 bits by keeping the high byte.
    gray = (np.clip(np.asarray(image), 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)
  if image.mode != 'RGB':
    image = image.convert('RGB')
  return np.asarray(image, np.uint8)


def decode_label(data: bytes, name: str) -> np.ndarray:
  """Decodes a label file's bytes to its raw values.

  Palette ('P') PNGs give their indices (PASCAL VOC), 8- and 16-bit grayscale their values;
  an RGB label is accepted only when its three channels are equal everywhere.

  Args:
    data: the file's bytes.
    name: file name for error messages.

  Returns:
    int32 [H, W] raw values.
  """
  image = _open(data, name, 'label')
  if image.mode in ('P', 'L', 'I;16', 'I;16B', 'I;16L', 'I'):
    return np.asarray(image).astype(np.int32)
  if image.mode in ('RGB', 'RGBA'):
    rgb = np.asarray(image)[..., :3]
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
      return rgb[..., 0].astype(np.int32)
    raise BadExampleError(
      f'{name}: the label is a colour image; labels must hold class indices (a grayscale '
      'or palette PNG). Convert colour-coded labels to indices first.'
    )
  raise BadExampleError(f'{name}: unsupported label image mode {image.mode!r}.')


def map_label(raw: np.ndarray, table: np.ndarray, name: str) -> np.ndarray:
  """Applies a label_table; raw values it marks invalid (or >= 256) raise BadExampleError.

  Args:
    raw: int [H, W] raw label values.
    table: int16 [256] from label_table.
    name: file name for error messages.

  Returns:
    uint8 [H, W] classes (255 = ignore).
  """
  if raw.size and (raw.min() < 0 or raw.max() > 255):
    bad = np.unique(raw[(raw < 0) | (raw > 255)])
    raise BadExampleError(
      f'{name}: label values {_listed(bad)} do not fit in 8 bits; expected {describe_table(table)}.'
    )
  mapped = table[raw]
  if (mapped == INVALID).any():
    bad = np.unique(raw[mapped == INVALID])
    raise BadExampleError(
      f'{name}: unexpected label values {_listed(bad)}; expected {describe_table(table)}.'
    )
  return mapped.astype(np.uint8)


def _listed(values: np.ndarray, limit: int = 10) -> str:
  shown = ', '.join(str(int(v)) for v in values[:limit])
  return f'[{shown}{", ..." if len(values) > limit else ""}]'


def describe_table(table: np.ndarray) -> str:
  """The raw values a label_table accepts, in words.

  Args:
    table: int16 [256] from label_table.

  Returns:
    e.g. 'values in 0..10, 255'.
  """
  valid = np.flatnonzero(table != INVALID)
  runs, start = [], None
  for i, v in enumerate(valid):
    if start is None:
      start = v
    if i + 1 == len(valid) or valid[i + 1] != v + 1:
      runs.append(f'{start}' if start == v else f'{start}..{v}')
      start = None
  return 'values in ' + ', '.join(runs)


def decode_pair(
  image_data: bytes,
  label_data: bytes,
  table: np.ndarray,
  *,
  image_name: str,
  label_name: str,
) -> tuple[np.ndarray, np.ndarray]:
  """Decodes, checks and maps one (image, label) pair.

  Args:
    image_data: the image file's bytes.
    label_data: the label file's bytes.
    table: label_table for the raw label values.
    image_name: image file name for error messages.
    label_name: label file name for error messages.

  Returns:
    image uint8 [H, W, 3] and label uint8 [H, W].
  """
  image = decode_image(image_data, image_name)
  raw = decode_label(label_data, label_name)
  # Same check as util/dataset.py SemData.__getitem__ ("Image & label shape mismatch").
  if image.shape[:2] != raw.shape:
    raise BadExampleError(
      f'{label_name}: label is {raw.shape[1]}x{raw.shape[0]} (WxH) but its image '
      f'{image_name} is {image.shape[1]}x{image.shape[0]}.'
    )
  return image, map_label(raw, table, label_name)


class SkipCounter:
  """Counts and logs skipped bad examples (data_config.skip_bad_examples), thread-safe."""

  def __init__(self, what: str):
    self.what = what
    self.count = 0
    self._lock = threading.Lock()

  def skip(self, error: Exception) -> None:
    with self._lock:
      self.count += 1
      count = self.count
    logging.warning('Skipped bad example %d of %s: %s', count, self.what, error)
