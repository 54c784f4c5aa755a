"""Data sources: one process's examples {'image': uint8 [H, W, 3], 'label': uint8 [H, W]}.

config.data.name picks the source: synthetic, ade20k | voc2012 | cityscapes (TFDS builders,
`python -m psp_jax.data.prepare NAME`), list (semseg list files) or folder
(root/images/<split> beside root/labels/<split>). Labels come out mapped (255 = ignore).

  examples = get_source(config.data, 'validation', process_index=0, process_count=1)

Design: docs/design.md#data-sources
"""

import contextlib
import dataclasses
import fcntl
import inspect
import logging
import os
import pathlib
from collections.abc import Callable
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

from psp_jax import errors
from psp_jax.data import decode, files, synthetic
from psp_jax.data.builders import BUILDERS, MissingDataError
from psp_jax.data.builders import synthetic as synthetic_builder
from psp_jax.data.builders.common import is_prepared

_SPLIT_ALIASES = {'val': 'validation', 'training': 'train'}
# config.data.synthetic's keys: the arguments of the synthetic builder's make_config.
SYNTHETIC_KEYS = tuple(inspect.signature(synthetic_builder.make_config).parameters)
_FOLDER_SPLITS = {'train': ('train', 'training'), 'validation': ('validation', 'val')}


def prepare_command(name: str) -> str:
  """The shell command that prepares a TFDS-backed data set."""
  return f'python -m psp_jax.data.prepare {name} --manual_dir DIR [--data_dir DATA_DIR]'


def _check_classes(data_config: Any, expected: int) -> None:
  got = data_config.num_classes
  if got is not None and int(got) != expected:
    raise errors.InvalidInputError(
      f'config.data.num_classes is {got} but {data_config.name} has {expected} classes: set '
      f"--config.data.num_classes={expected} (or use the data set's config)."
    )


def _check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise errors.InvalidInputError(
      f'Need 0 <= process_index < process_count, got {process_index}, {process_count}.'
    )


# --- TFDS-backed sources. -------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  """An exclusive lock on path, so processes on one machine prepare a data set only once."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w') as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def synthetic_options(data_config: Any) -> dict[str, int]:
  """config.data.synthetic's image_size / num_train / num_val / seed."""
  options = data_config.synthetic
  unknown = set(options) - set(SYNTHETIC_KEYS)
  if unknown:
    raise errors.InvalidInputError(
      f'Unknown config.data.synthetic keys {sorted(unknown)}; known: {sorted(SYNTHETIC_KEYS)}.'
    )
  return {k: int(options[k]) for k in SYNTHETIC_KEYS}


def _builder(data_config: Any) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder of data_config.name (the synthetic one is prepared if needed)."""
  name, data_dir = data_config.name, data_config.data_dir
  data_dir = data_dir and os.path.expanduser(data_dir)
  if name == 'synthetic':
    _check_classes(data_config, synthetic.NUM_CLASSES)
    config = synthetic_builder.make_config(**synthetic_options(data_config))
    builder = synthetic_builder.Synthetic(data_dir=data_dir, config=config)
    if not is_prepared(builder):
      with _file_lock(pathlib.Path(builder.data_dir_root) / 'psp_synthetic.lock'):
        builder = synthetic_builder.Synthetic(data_dir=data_dir, config=config)
        if not is_prepared(builder):
          logging.warning(
            'Preparing the synthetic data set (%s) in %s, once.',
            config.description,
            builder.data_dir,
          )
          builder.download_and_prepare()
    return builder
  builder_cls = BUILDERS[name]
  _check_classes(data_config, builder_cls.NUM_CLASSES)
  builder = builder_cls(data_dir=data_dir)
  if not is_prepared(builder):
    raise MissingDataError(
      f'The {name} data set is not prepared in {builder.data_dir} (config.data.data_dir = '
      f'{data_dir or "the TFDS default"}). Prepare it once with\n  {prepare_command(name)}\n'
      f'where DIR holds {builder_cls.EXPECTED}.'
    )
  return builder


def _tfds_split(builder: tfds.core.DatasetBuilder, split: str) -> str:
  split = _SPLIT_ALIASES.get(split, split)
  base = split.split('[')[0]
  if base not in builder.info.splits:
    raise errors.InvalidInputError(
      f'{builder.name} has no split {base!r}; prepared splits: {sorted(builder.info.splits)}.'
    )
  return split


def _decode_tfds(record: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  data = record['image']
  # JPEGs decoded with the accurate integer DCT, as cv2.imread (util/dataset.py) and PIL do;
  # TF's default fast DCT differs from them by up to a few levels.
  image = tf.cond(
    tf.io.is_jpeg(data),
    lambda: tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE'),
    lambda: tf.io.decode_png(data, channels=3),
  )
  image.set_shape([None, None, 3])
  label = tf.io.decode_png(record['label'], channels=1)  # The builders store labels as PNG.
  return {'image': image, 'label': tf.squeeze(label, -1)}


def _tfds_records(
  data_config: Any, split: str, process_index: int, process_count: int, shuffle_seed: int | None
) -> 'Records':
  builder = _builder(data_config)
  part = tfds.even_splits(_tfds_split(builder, split), n=process_count)[process_index]
  ds = builder.as_dataset(
    split=part,
    shuffle_files=shuffle_seed is not None,
    decoders={'image': tfds.decode.SkipDecoding(), 'label': tfds.decode.SkipDecoding()},
    read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
  )

  def decode(records: tf.data.Dataset) -> tf.data.Dataset:
    return records.map(
      lambda e: {**_others(e), **_decode_tfds(e['record'])}, num_parallel_calls=tf.data.AUTOTUNE
    )

  return Records(ds.map(lambda record: {'record': record}), decode)


# --- List-file and folder sources. ----------------------------------------------------------


def _list_pairs(data_config: Any, split: str) -> list[tuple[str, str]]:
  """(image, label) paths of a semseg list file (util/dataset.py make_dataset)."""
  if split in ('train', data_config.train_split):
    key = 'train_list'
  elif split in ('validation', 'val', 'test', data_config.eval_split):
    key = 'val_list'
  else:
    raise errors.InvalidInputError(
      f'list source: split {split!r} is neither the train nor the eval split.'
    )
  list_file, root = data_config[key], data_config.root or ''
  if list_file is None:
    raise errors.InvalidInputError(
      f'list source: config.data.{key} is not set (needed for split {split!r}).'
    )
  path = pathlib.Path(list_file)
  if not path.is_file() and root and (pathlib.Path(root) / list_file).is_file():
    path = pathlib.Path(root) / list_file
  if not path.is_file():
    raise MissingDataError(
      f'list source: config.data.{key} = {list_file} is not a file '
      f'(looked as given and under config.data.root = {root!r}).'
    )
  pairs = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    # The official format separates the two paths with white space; a TAB separates paths
    # that contain spaces.
    parts = [p.strip() for p in line.split('\t')] if '\t' in line else line.split()
    if not any(parts):
      continue
    if len(parts) != 2 or not all(parts):
      raise errors.InvalidInputError(
        f'{path}:{number}: expected `image_path label_path`, got {line!r}. Paths that contain '
        'spaces go with a TAB between them: `images/a b.jpg<TAB>labels/a b.png`.'
      )
    pairs.append((os.path.join(root, parts[0]), os.path.join(root, parts[1])))
  if not pairs:
    raise MissingDataError(f'list source: {path} (config.data.{key}) lists no examples.')
  return pairs


def _folder_pairs(data_config: Any, split: str) -> list[tuple[str, str]]:
  """(image, label) paths of root/images/<split>/ and root/labels/<split>/, by stem."""
  root = data_config.root
  if root is None:
    raise errors.InvalidInputError('folder source: config.data.root is not set.')
  root = pathlib.Path(root)
  names = _FOLDER_SPLITS.get(_SPLIT_ALIASES.get(split, split), (split,))
  found = next((n for n in names if (root / 'images' / n).is_dir()), None)
  if found is None:
    raise MissingDataError(
      f'folder source: none of {", ".join(str(root / "images" / n) for n in names)} exists. '
      f'Expected images in {root}/images/<split>/ and labels (PNG, class indices) with the '
      f'same relative path and stem in {root}/labels/<split>/.'
    )
  image_dir, label_dir = root / 'images' / found, root / 'labels' / found
  if not label_dir.is_dir():
    raise MissingDataError(f'folder source: {label_dir} does not exist (labels for {image_dir}).')
  paths = sorted(image_dir.rglob('*'))
  images = {
    p.relative_to(image_dir).with_suffix('').as_posix(): p
    for p in paths
    if p.suffix.lower() in files.IMAGE_EXTENSIONS
  }
  labels = {
    p.relative_to(label_dir).with_suffix('').as_posix(): p for p in sorted(label_dir.rglob('*.png'))
  }
  netpbm = [p for p in paths if p.suffix.lower() in files.NETPBM_EXTENSIONS]
  if netpbm:
    raise MissingDataError(
      f'folder source: {len(netpbm)} PGM/PPM images in {image_dir} cannot be read (TensorFlow '
      f'has no decoder for them), e.g. {", ".join(map(str, netpbm[:5]))}: save them as PNG.'
    )
  if not images:
    raise MissingDataError(
      f'folder source: {image_dir} holds no images ({", ".join(files.IMAGE_EXTENSIONS)}).'
    )
  missing = [str(images[k]) for k in images if k not in labels]
  if missing:
    raise MissingDataError(
      f'folder source: {len(missing)} images in {image_dir} have no label '
      f'{label_dir}/<stem>.png, e.g. {", ".join(missing[:5])}.'
    )
  return [(str(images[k]), str(labels[k])) for k in images]


def _file_pairs(data_config: Any, split: str) -> list[tuple[str, str]]:
  """The list/folder pairs whose files exist (missing ones fail, or are skipped and logged)."""
  pairs = (_list_pairs if data_config.name == 'list' else _folder_pairs)(data_config, split)
  missing = [p for pair in pairs for p in pair if not os.path.isfile(p)]
  if missing:
    message = (
      f'{data_config.name} source ({split}): {len(missing)} files do not exist, '
      f'e.g. {", ".join(missing[:5])}.'
    )
    if not data_config.skip_bad_examples:
      raise MissingDataError(message)
    logging.warning('%s Skipping those examples.', message)
    gone = set(missing)
    pairs = [p for p in pairs if p[0] not in gone and p[1] not in gone]
  if not pairs:
    raise MissingDataError(
      f'{data_config.name} source ({split}): no examples left after skipping those.'
    )
  return pairs


def _file_records(
  data_config: Any, split: str, process_index: int, process_count: int, shuffle_seed: int | None
) -> 'Records':
  pairs = _file_pairs(data_config, split)[process_index::process_count]
  if data_config.num_classes is None:
    raise errors.InvalidInputError(
      f'{data_config.name} source: config.data.num_classes is not set.'
    )
  num_classes = int(data_config.num_classes)
  ignore = int(data_config.ignore_label)
  table = files.label_table(num_classes=num_classes)
  table[255] = files.INVALID
  table[ignore] = ignore

  # TensorFlow ops only (decode.py): a Python call inside tf.data can deadlock the iterator's
  # destructor, which holds the GIL while it waits for the call.
  @tf.autograph.experimental.do_not_convert
  def read(e):
    return {**_others(e), **decode.read_pair(*tf.unstack(e['record']), table)}

  def decode_records(records: tf.data.Dataset) -> tf.data.Dataset:
    ds = records.map(read, num_parallel_calls=tf.data.AUTOTUNE)
    skip = bool(data_config.skip_bad_examples)
    return decode.drop_or_raise(ds, skip=skip, what=f'{data_config.name} {split}')

  ds = tf.data.Dataset.from_tensor_slices([list(pair) for pair in pairs])
  if shuffle_seed is not None:
    ds = ds.shuffle(len(pairs), seed=shuffle_seed, reshuffle_each_iteration=True)
  return Records(ds.map(lambda record: {'record': record}), decode_records)


# --- Public API. ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Records:
  """A split's examples before decoding: cheap to read whole, decoded where they are used.

  Attributes:
    dataset: one pass in a fixed order of {'record': the encoded example} (a TFDS record's
      image and label bytes, or a list/folder pair's two paths).
    decode: a dataset transform, {'record', **others} -> {'image': uint8 [H, W, 3],
      'label': uint8 [H, W] (255 = ignore), **others}; the others pass through. Bad
      list/folder files fail, or are dropped with skip_bad_examples.
  """

  dataset: tf.data.Dataset
  decode: Callable[[tf.data.Dataset], tf.data.Dataset]


def _others(element: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  return {k: v for k, v in element.items() if k != 'record'}


def get_records(
  data_config: Any,
  split: str,
  *,
  process_index: int = 0,
  process_count: int = 1,
  shuffle_seed: int | None = None,
) -> Records:
  """This process's examples of a split, not yet decoded (arguments as get_source's)."""
  _check_process(process_index, process_count)
  _check_known(data_config)
  return _SOURCES[data_config.name](data_config, split, process_index, process_count, shuffle_seed)


def get_source(
  data_config: Any,
  split: str,
  *,
  process_index: int = 0,
  process_count: int = 1,
  shuffle_seed: int | None = None,
) -> tf.data.Dataset:
  """This process's examples of a split, decoded, labels mapped, in a fixed order.

  Args:
    data_config: config.data (name, data_dir, root, train_list, val_list, num_classes,
      ignore_label, skip_bad_examples, synthetic).
    split: 'train', 'validation' ('val'), 'test', or a TFDS slice such as 'train[:100]'.
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing the split.
    shuffle_seed: None reads in a fixed order; an int shuffles the files (TFDS) or the
      pairs (list/folder), differently on each pass.

  Returns:
    A dataset of {'image': uint8 [H, W, 3], 'label': uint8 [H, W]} (255 = ignore).
  """
  records = get_records(
    data_config,
    split,
    process_index=process_index,
    process_count=process_count,
    shuffle_seed=shuffle_seed,
  )
  return records.decode(records.dataset)


def _check_known(data_config: Any) -> None:
  if data_config.name not in _SOURCES:
    raise errors.InvalidInputError(
      f'Unknown config.data.name {data_config.name!r}; known: {sorted(_SOURCES)}.'
    )


def check_available(data_config: Any, splits: tuple[str, ...]) -> None:
  """Raises now what reading these splits would raise first, before a run writes anything.

  A list file or folder that is missing, lists no examples or names missing files (unless
  skip_bad_examples), a data set not prepared (the synthetic one is prepared), a split it
  lacks, an unknown source.
  """
  _check_known(data_config)
  if data_config.name in ('list', 'folder'):
    for split in splits:
      _file_pairs(data_config, split)
    return
  builder = _builder(data_config)
  for split in splits:
    _tfds_split(builder, split)


def num_examples(data_config: Any, split: str) -> int:
  """Examples in a whole split (over all processes).

  Args:
    data_config: config.data.
    split: as for get_source.

  Returns:
    The count (for list/folder sources, of pairs whose files exist).
  """
  if data_config.name in ('list', 'folder'):
    return len(_file_pairs(data_config, split))
  _check_known(data_config)
  builder = _builder(data_config)
  return builder.info.splits[_tfds_split(builder, split)].num_examples


_SOURCES = {
  'synthetic': _tfds_records,
  **dict.fromkeys(BUILDERS, _tfds_records),
  'list': _file_records,
  'folder': _file_records,
}
