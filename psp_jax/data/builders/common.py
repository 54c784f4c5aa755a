"""Shared machinery of the project's TFDS builders: file trees (folders or zips), decoding.

A builder lists its manual directory (a folder, or a zip read in place), matches images with
labels by regular expressions, and decodes, checks and re-encodes every pair in a few
threads. Design: docs/design.md#data-sources
"""

import collections
import concurrent.futures
import dataclasses
import io
import logging
import os
import pathlib
import re
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from psp_jax import errors
from psp_jax.data import files

_ZIPS = threading.local()  # Per-thread open zip archives: ZipFile reads are not thread-safe.


class MissingDataError(errors.UserError, FileNotFoundError):
  """The manual directory lacks the files a builder expects; says which and how to fix it."""


@dataclasses.dataclass(frozen=True)
class FileRef:
  """One file, on disk (archive None) or a member of a zip archive."""

  path: str
  archive: str | None = None

  def read(self) -> bytes:
    if self.archive is None:
      return pathlib.Path(self.path).read_bytes()
    handles = getattr(_ZIPS, 'handles', None)
    if handles is None:
      handles = _ZIPS.handles = {}
    if self.archive not in handles:
      handles[self.archive] = zipfile.ZipFile(self.archive)
    return handles[self.archive].read(self.path)

  def __str__(self) -> str:
    return self.path if self.archive is None else f'{self.archive}:{self.path}'


def _hidden(path: str) -> bool:
  """macOS metadata ('__MACOSX/', '._x.jpg') and other dot files, found in some archives."""
  return any(part.startswith(('.', '__MACOSX')) for part in path.split('/'))


def folder_tree(root: str | os.PathLike) -> dict[str, FileRef]:
  """All (non-hidden) files under root, by '/'-separated path relative to root."""
  root = pathlib.Path(root)
  tree = {}
  for directory, _, names in os.walk(root):
    for name in names:
      path = pathlib.Path(directory, name)
      relative = path.relative_to(root).as_posix()
      if not _hidden(relative):
        tree[relative] = FileRef(str(path))
  return tree


def zip_tree(archive: str | os.PathLike) -> dict[str, FileRef]:
  """All (non-hidden) files in a zip archive, by member name."""
  try:
    with zipfile.ZipFile(archive) as z:
      names = [n for n in z.namelist() if not n.endswith('/') and not _hidden(n)]
  except (OSError, zipfile.BadZipFile) as e:
    raise MissingDataError(f'{archive}: cannot read the zip archive ({e}).') from e
  return {n: FileRef(n, str(archive)) for n in names}


def match(tree: dict[str, FileRef], pattern: str) -> dict[tuple[str, ...], FileRef]:
  """Files whose path matches pattern (searched, so any prefix), by the pattern's groups."""
  regex = re.compile(pattern)
  found = {}
  for path, ref in sorted(tree.items()):
    m = regex.search(path)
    if m:
      found[m.groups()] = ref
  return found


def pair_up(
  images: dict, labels: dict, *, what: str, skip_bad_examples: bool
) -> list[tuple[str, FileRef, FileRef]]:
  """Pairs images and labels with the same key; an image without a label is an error.

  Args:
    images: key -> image file.
    labels: key -> label file.
    what: description of the split for messages.
    skip_bad_examples: log and drop unpaired images instead of raising.

  Returns:
    Sorted (key string, image, label) triples.
  """
  missing = sorted(set(images) - set(labels))
  if missing:
    names = ', '.join(str(images[k]) for k in missing[:5])
    message = f'{what}: {len(missing)} of {len(images)} images have no label file, e.g. {names}.'
    if not skip_bad_examples:
      raise MissingDataError(message + ' Pass --skip_bad_examples to leave them out.')
    logging.warning('%s Skipping them.', message)
  extra = len(set(labels) - set(images))
  if extra:
    logging.warning('%s: %d label files have no image; ignored.', what, extra)
  return [('/'.join(k), images[k], labels[k]) for k in sorted(set(images) & set(labels))]


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
  """fn over items in `workers` threads, results in order, at most 4 * workers in flight."""
  if workers <= 1:
    yield from map(fn, items)
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    window = collections.deque()
    for item in items:
      window.append(pool.submit(fn, item))
      if len(window) >= 4 * workers:
        yield window.popleft().result()
    while window:
      yield window.popleft().result()


def png_bytes(array: np.ndarray, compress_level: int = 3) -> bytes:
  """PNG encoding of a uint8 [H, W] or [H, W, 3] array."""
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG', compress_level=compress_level)
  return buffer.getvalue()


def stored_image_bytes(data: bytes, image: np.ndarray) -> bytes:
  """The file's own bytes when TF decodes them to the same RGB, else a PNG of `image`."""
  with Image.open(io.BytesIO(data)) as header:
    if header.mode == 'RGB' and header.format in ('JPEG', 'PNG'):
      return data
  return png_bytes(image)


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  """builder.is_prepared() without its warning when the answer is no."""
  return (builder.data_path / 'dataset_info.json').exists()


def features(image_format: str) -> tfds.features.FeaturesDict:
  """image: encoded RGB; label: single-channel PNG of classes (255 = ignore)."""
  return tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(shape=(None, None, 3), encoding_format=image_format),
      'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
      'file_name': tfds.features.Text(),
    }
  )


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders that read a data set from a manual directory (no download).

  Subclasses define locate(manual_dir) -> {split: [(key, image FileRef, label FileRef)]},
  LABEL_TABLE (files.label_table of the raw label values), NUM_CLASSES, IMAGE_FORMAT and
  EXPECTED (what the manual directory must hold, for error messages).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  NUM_CLASSES: int
  LABEL_TABLE: np.ndarray
  IMAGE_FORMAT = 'jpeg'
  EXPECTED = ''
  DESCRIPTION = ''
  HOMEPAGE = ''

  def __init__(self, *, skip_bad_examples: bool = False, num_workers: int | None = None, **kw):
    self.skip_bad_examples = skip_bad_examples
    self.num_workers = num_workers or os.cpu_count() or 1
    super().__init__(**kw)

  @classmethod
  def locate(
    cls, manual_dir: str | os.PathLike, *, skip_bad_examples: bool = False
  ) -> dict[str, list[tuple[str, FileRef, FileRef]]]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=features(self.IMAGE_FORMAT),
      supervised_keys=('image', 'label'),
      homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    splits = self.locate(dl_manager.manual_dir, skip_bad_examples=self.skip_bad_examples)
    for split, pairs in splits.items():
      logging.info('%s %s: %d image/label pairs found.', self.name, split, len(pairs))
    return {split: self._generate_examples(split, pairs) for split, pairs in splits.items()}

  def _encode(self, item: tuple[str, FileRef, FileRef]) -> tuple[str, dict] | Exception:
    key, image_ref, label_ref = item
    try:
      image_data, label_data = image_ref.read(), label_ref.read()
      image, label = files.decode_pair(
        image_data,
        label_data,
        self.LABEL_TABLE,
        image_name=str(image_ref),
        label_name=str(label_ref),
      )
    except (files.BadExampleError, OSError, KeyError) as e:
      return e if isinstance(e, files.BadExampleError) else files.BadExampleError(str(e))
    example = {
      'image': stored_image_bytes(image_data, image),
      'label': png_bytes(label),
      'file_name': image_ref.path.rsplit('/', 1)[-1],
    }
    return key, example

  def _generate_examples(self, split: str, pairs: list[tuple[str, FileRef, FileRef]]):
    skipped = files.SkipCounter(f'{self.name} {split}')
    for result in ordered_map(self._encode, pairs, self.num_workers):
      if isinstance(result, Exception):
        if not self.skip_bad_examples:
          raise files.BadExampleError(
            f'{result} Fix or remove the file, or prepare with --skip_bad_examples.'
          )
        skipped.skip(result)
        continue
      yield result
    if skipped.count:
      logging.warning('%s %s: skipped %d bad examples.', self.name, split, skipped.count)
