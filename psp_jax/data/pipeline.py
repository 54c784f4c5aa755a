"""tf.data input pipelines: augmented training batches, and their numpy and global forms.

Each process builds the training stream of the whole split and takes its rows of each global
batch (build_train_dataset), then turns them into global jax.Arrays with `to_global`.
"""

import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf
from jax.sharding import NamedSharding, PartitionSpec

from psp_jax import errors, sizes
from psp_jax.data import augment, decode, mmseg_augment, sources, transforms

_MAX_EPOCHS = 2**62  # "forever": the training stream repeats until the caller stops reading
_EPOCH, _INDEX = 'psp_epoch', 'psp_index'  # An example's place in the stream, for its seed.


def _range(value: Sequence[float] | None, name: str) -> tuple[float, float] | None:
  if value is None:  # off (--config.data.NAME=None)
    return None
  try:
    low, high = (float(v) for v in value)
  except (TypeError, ValueError):
    low = high = float('nan')
  if not low < high:
    raise errors.InvalidInputError(
      f'data.{name} must be (min, max) with min < max, or None for off; got {value!r} '
      f"(on the command line: --config.data.{name}='(0.5, 2.0)' or =None)."
    )
  return low, high


def augment_kwargs(data_config: Any) -> dict[str, Any]:
  """augment.train_augment keyword arguments from config.data, validated."""
  scale_range = _range(data_config.scale_range, 'scale_range')
  if scale_range is not None and scale_range[0] <= 0:
    raise errors.InvalidInputError(f'data.scale_range must be positive, got {scale_range!r}.')
  ignore_label = int(data_config.ignore_label)
  if not 0 <= ignore_label <= 255:
    raise errors.InvalidInputError(
      f'data.ignore_label must fit the uint8 labels (0..255), got {ignore_label}.'
    )
  return dict(
    crop_size=sizes.pair(data_config.crop_size, 'config.data.crop_size'),
    scale_range=scale_range,
    rotate_range=_range(data_config.rotate_range, 'rotate_range'),
    blur=bool(data_config.blur),
    flip=bool(data_config.flip),
    ignore_label=ignore_label,
    aspect_ratio_range=_range(data_config.get('aspect_ratio_range', None), 'aspect_ratio_range'),
  )


RECIPES = ('official', 'mmseg')  # config.data.recipe


def mmseg_kwargs(data_config: Any) -> dict[str, Any]:
  """mmseg_augment.mmseg_augment keyword arguments from config.data (recipe 'mmseg').

  data.scale_range is RandomResize's ratio_range and data.flip its RandomFlip; the
  official-only ops (rotate_range, blur) must be off, so no key is silently unused.
  """
  official = augment_kwargs(data_config)  # Validates crop, scale_range, ignore_label.
  if official['rotate_range'] is not None or official['blur']:
    raise errors.InvalidInputError(
      "data.recipe='mmseg' has no rotation or blur: set data.rotate_range=None and "
      'data.blur=False (configs/mmseg_*.py do).'
    )
  mm = data_config.mmseg
  try:
    scale = tuple(int(v) for v in mm.scale)
  except (TypeError, ValueError):
    scale = ()
  if len(scale) != 2 or min(scale) < 1:
    raise errors.InvalidInputError(
      f'data.mmseg.scale must be two positive edges (long, short), got {mm.scale!r} '
      "(on the command line: --config.data.mmseg.scale='(2048, 512)')."
    )
  if not 0 < float(mm.cat_max_ratio) <= 1:
    raise errors.InvalidInputError(
      f'data.mmseg.cat_max_ratio must be in (0, 1] (1 = off), got {mm.cat_max_ratio}.'
    )
  if mm.pad not in mmseg_augment.PADS:
    raise errors.InvalidInputError(
      f'data.mmseg.pad must be one of {mmseg_augment.PADS}, got {mm.pad!r}.'
    )
  return dict(
    crop_size=official['crop_size'],
    scale=scale,
    ratio_range=official['scale_range'],
    cat_max_ratio=float(mm.cat_max_ratio),
    flip=official['flip'],
    photometric=bool(mm.photometric),
    pad=str(mm.pad),
    ignore_label=official['ignore_label'],
  )


def train_augmenter(data_config: Any) -> Callable[[transforms.Example, tf.Tensor], Any]:
  """The training augmentation config.data.recipe names, as fn(example, seed), validated."""
  recipe = data_config.recipe
  if recipe == 'official':
    return functools.partial(augment.train_augment, **augment_kwargs(data_config))
  if recipe == 'mmseg':
    return functools.partial(mmseg_augment.mmseg_augment, **mmseg_kwargs(data_config))
  raise errors.InvalidInputError(f'data.recipe must be one of {RECIPES}, got {recipe!r}.')


def options(deterministic: bool, num_threads: int | None) -> tf.data.Options:
  """tf.data options: own thread pool, one thread per op (parallelism comes from map)."""
  options = tf.data.Options()
  options.deterministic = deterministic
  # tf.data, XLA and the training loop share the host's cores; a private pool sized to the
  # cores keeps tf.data from oversubscribing them through TF's global pools.
  options.threading.private_threadpool_size = num_threads or os.cpu_count() or 1
  options.threading.max_intra_op_parallelism = 1
  return options


def _checked(example: transforms.Example) -> transforms.Example:
  """Fails clearly when image and label sizes differ (SemData raises the same)."""
  check = tf.debugging.assert_equal(
    tf.shape(example['image'])[:2],
    tf.shape(example['label']),
    message='image and label shapes differ; check the data set (image [H, W, 3], label [H, W])',
  )
  with tf.control_dependencies([check]):
    return {'image': tf.identity(example['image']), 'label': example['label']}


def _cardinality(dataset: tf.data.Dataset) -> int | None:
  """The number of elements if tf.data knows it, else None; an infinite source is an error."""
  n = int(dataset.cardinality())
  if n == tf.data.INFINITE_CARDINALITY:
    raise ValueError('The data source repeats forever; give the pipeline a single pass.')
  return None if n == tf.data.UNKNOWN_CARDINALITY else n


def build_train_dataset(
  source: tf.data.Dataset,
  data_config: Any,
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  start_step: int = 0,
  num_threads: int | None = None,
  decode: Callable[[tf.data.Dataset], tf.data.Dataset] | None = None,
) -> tf.data.Dataset:
  """This process's rows of the infinite stream of augmented global training batches.

  The stream is a function of the seed alone, whatever the number of processes: epoch e is
  the whole split shuffled with a seed derived from (seed, e), the i-th example of epoch e
  is augmented with a stateless seed derived from (seed, e, i), and process p of P takes
  rows [p * B / P, (p + 1) * B / P) of each global batch of B. So results do not depend on
  thread scheduling or on how the devices are split into processes (a run resumes on
  another process count at the same data), and each process decodes and augments only its
  own rows: it reads every record of the split (undecoded bytes, or a pair of paths), but
  decodes 1/P of them. With data_config.deterministic the batches are reproducible, and
  start_step=k yields exactly the batches from step k on (skipping whole epochs without
  reading them, and the rest of the epoch before any decoding).

  Args:
    source: the whole split, one pass, in a deterministic order: examples {'image': uint8
      [H, W, 3], 'label': uint8 [H, W]}, or with decode {'record': ...} (sources.Records).
    data_config: config.data (recipe, crop_size, scale_range, rotate_range, blur, flip,
      mmseg, ignore_label, shuffle_buffer, deterministic, transfer_dtype).
    batch_size: the global batch (all processes); process_count must divide it.
    seed: the run's data seed.
    process_index: this process, in [0, process_count).
    process_count: processes sharing each global batch.
    start_step: number of batches to skip (resuming a run).
    num_threads: tf.data thread-pool size (default: the number of cores).
    decode: sources.Records.decode for a source of records; None for decoded examples.

  Returns:
    A dataset of {'image': float32 [batch_size / process_count, crop_h, crop_w, 3]
    normalised (uint8 of 0..255 with data_config.transfer_dtype 'uint8':
    transforms.to_uint8), 'label': int32 [batch_size / process_count, crop_h, crop_w]}.
  """
  if batch_size < 1 or start_step < 0:
    raise ValueError(f'Need batch_size >= 1 and start_step >= 0, got {batch_size}, {start_step}.')
  if process_count < 1 or not 0 <= process_index < process_count or batch_size % process_count:
    raise ValueError(
      f'Need 0 <= process_index < process_count dividing batch_size, got {process_index}, '
      f'{process_count}, {batch_size}.'
    )
  augment_fn = train_augmenter(data_config)
  buffer = int(data_config.shuffle_buffer)
  # The second entry once held the process index; 0 keeps the stream of one-process runs.
  base_key = tf.constant([seed, 0], tf.int64)
  fold_in = tf.random.experimental.stateless_fold_in

  def epoch(e):
    key = fold_in(base_key, e)
    ds = source
    if buffer > 1:
      shuffle_seed = tf.random.stateless_uniform(
        [], fold_in(key, 0), minval=None, maxval=None, dtype=tf.int64
      )
      ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    return ds.enumerate().map(lambda i, element: {**element, _EPOCH: e, _INDEX: i})

  skip = start_step * batch_size
  epoch_size = _cardinality(source)
  # An empty source would make the epoch loop below spin forever.
  if epoch_size == 0 or (epoch_size is None and not list(source.take(1))):
    raise ValueError('The training source is empty.')
  first_epoch = 0
  if epoch_size is not None:
    first_epoch, skip = divmod(skip, epoch_size)
  elif skip:
    logging.warning(
      'Training source has unknown length: resuming reads %d examples to skip them.', skip
    )
  ds = tf.data.Dataset.range(first_epoch, _MAX_EPOCHS).flat_map(epoch)
  # Skipping here, before decoding, reads but never decodes the skipped examples.
  ds = ds.skip(skip)
  local = batch_size // process_count
  if process_count > 1:  # The stream starts at a global batch: position k is row k % B.
    ds = ds.enumerate().filter(lambda k, _: (k % batch_size) // local == process_index)
    ds = ds.map(lambda _, element: element)
  if decode is not None:
    ds = decode(ds)

  as_uint8 = data_config.transfer_dtype == 'uint8'

  def prepare(element):
    key = fold_in(fold_in(fold_in(base_key, element[_EPOCH]), 1), element[_INDEX])
    example = {'image': element['image'], 'label': element['label']}
    out = augment_fn(_checked(example), key)
    if as_uint8:  # Normalised again inside the train step.
      out = {**out, 'image': transforms.to_uint8(out['image'])}
    return out

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.with_options(options(bool(data_config.deterministic), num_threads))


def create_train_dataset(
  data_config: Any,
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  start_step: int = 0,
  num_threads: int | None = None,
) -> tf.data.Dataset:
  """This process's rows of the augmented global batches of config.data's train split.

  Args:
    data_config: config.data.
    batch_size: the global batch.
    seed: the run's data seed.
    process_index: this process (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    start_step: batches to skip, to resume a run at the same data position.
    num_threads: tf.data thread-pool size (default: the number of cores).

  Returns:
    See build_train_dataset.
  """
  records = sources.get_records(data_config, data_config.train_split)
  return build_train_dataset(
    records.dataset,
    data_config,
    batch_size=batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    start_step=start_step,
    num_threads=num_threads,
    decode=records.decode,
  )


def numpy_batches(dataset: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  """dataset.as_numpy_iterator(), with a bad data file reported as itself.

  A bad list/folder file stops tf.data with a TensorFlow error that carries its message;
  decode.reported() re-raises it as a files.BadExampleError with just that message (the
  file's name and what is wrong), and logs the examples skipped so far
  (config.data.skip_bad_examples).

  Args:
    dataset: a tf.data pipeline.

  Yields:
    Its elements as numpy.
  """
  iterator = dataset.as_numpy_iterator()
  while True:
    try:
      with decode.reported():
        batch = next(iterator)
    except StopIteration:
      return
    yield batch


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, axis: str = 'data'):
  """Turns this process's batch into global jax.Arrays sharded on the leading axis.

  Args:
    batch: arrays whose leading axis is this process's part of the global batch.
    mesh: the device mesh.
    axis: mesh axis the batch is split over.

  Returns:
    The same structure of jax.Array with global leading size sum over processes.
  """
  sharding = NamedSharding(mesh, PartitionSpec(axis))
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
  )
