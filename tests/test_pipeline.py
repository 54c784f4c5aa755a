"""Tests of psp_jax.data.pipeline on small in-memory sources."""

import jax
import numpy as np
import pytest
import tensorflow as tf

from psp_jax.data import normalization, pipeline

from helpers import PIPELINE_CROP as CROP
from helpers import PIPELINE_EXAMPLES as NUM
from helpers import assert_same_batches, data_config, source, take


def example_ids(images):
  """Recovers i from flat normalised images (the mean colour of crop padding is ignored)."""
  mean = np.array([0.485, 0.456, 0.406]) * 255
  std = np.array([0.229, 0.224, 0.225]) * 255
  raw = images[..., 0] * std[0] + mean[0]
  values = [np.median(r[np.abs(r - mean[0]) > 0.5]) for r in raw]
  return [int(round((v - 5) / 10)) for v in values]


@pytest.fixture(scope='module')
def run_through():
  """The first 7 batches of 4 (three epochs of 10) with seed 0."""
  return take(pipeline.build_train_dataset(source(), data_config(), batch_size=4, seed=0), 7)


def test_train_batches_shapes_dtypes_and_labels(run_through):
  dataset = pipeline.build_train_dataset(source(), data_config(), batch_size=4, seed=0)
  assert dataset.element_spec['image'].shape == (4, CROP, CROP, 3)  # drop_remainder=True
  assert dataset.element_spec['label'].shape == (4, CROP, CROP)
  for batch in run_through:
    assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32
    assert set(np.unique(batch['label'])) <= set(range(7)) | {255}


def test_same_seed_same_batches_other_seed_differs(run_through):
  again = take(pipeline.build_train_dataset(source(), data_config(), batch_size=4, seed=0), 7)
  assert_same_batches(run_through, again)
  other = take(pipeline.build_train_dataset(source(), data_config(), batch_size=4, seed=1), 1)
  assert not np.array_equal(other[0]['image'], run_through[0]['image'])


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_take_their_rows_of_the_one_stream(run_through, process_count):
  def rows(process_index, start_step=0):
    dataset = pipeline.build_train_dataset(
      source(), data_config(), batch_size=4, seed=0, process_index=process_index,
      process_count=process_count, start_step=start_step)  # fmt: skip
    return take(dataset, 7 - start_step)

  parts = [rows(p) for p in range(process_count)]
  joined = [{k: np.concatenate([part[i][k] for part in parts]) for k in ('image', 'label')}
            for i in range(7)]  # fmt: skip
  assert_same_batches(run_through, joined)
  assert parts[0][0]['image'].shape[0] == 4 // process_count
  # Resumed on this process count, at a step inside epoch 1 (4 * 3 = 12 examples).
  rows_of_1 = slice(4 // process_count, 2 * (4 // process_count))
  for got, expected in zip(rows(1, start_step=3), run_through[3:], strict=True):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(got[key], expected[key][rows_of_1])
  with pytest.raises(ValueError, match='dividing batch_size'):
    pipeline.build_train_dataset(
      source(), data_config(), batch_size=3, seed=0, process_index=0, process_count=2
    )


@pytest.mark.parametrize('start_step', [1, 3, 5])
def test_start_step_resumes_at_the_same_batches(run_through, start_step):
  # 4 * 3 = 12 examples: epoch 1 at offset 2; 4 * 5 = 20: exactly the start of epoch 2.
  resumed = pipeline.build_train_dataset(
    source(), data_config(), batch_size=4, seed=0, start_step=start_step
  )
  assert_same_batches(run_through[start_step:], take(resumed, 7 - start_step))


def test_start_step_with_unknown_source_length(run_through):
  unknown = source().filter(lambda example: True)
  assert int(unknown.cardinality()) == tf.data.UNKNOWN_CARDINALITY
  resumed = pipeline.build_train_dataset(unknown, data_config(), batch_size=4, seed=0, start_step=3)
  assert_same_batches(run_through[3:5], take(resumed, 2))


def test_each_epoch_is_a_new_permutation():
  config = data_config(scale_range=None, rotate_range=None, blur=False, flip=False)
  dataset = pipeline.build_train_dataset(source(), config, batch_size=5, seed=3)
  ids = [i for batch in take(dataset, 4) for i in example_ids(batch['image'])]
  first, second = ids[:NUM], ids[NUM:]
  assert sorted(first) == list(range(NUM)) and sorted(second) == list(range(NUM))
  assert first != second


def test_an_example_is_augmented_afresh_each_epoch():
  config = data_config(shuffle_buffer=1)  # no shuffling: every epoch in the same order
  batches = take(pipeline.build_train_dataset(source(), config, batch_size=5, seed=0), 3)
  assert example_ids(batches[0]['image']) == example_ids(batches[2]['image']) == list(range(5))
  assert not np.array_equal(batches[0]['image'], batches[2]['image'])


def test_train_rejects_bad_config():
  with pytest.raises(ValueError, match='scale_range'):
    pipeline.build_train_dataset(
      source(), data_config(scale_range=(2.0, 0.5)), batch_size=2, seed=0
    )
  with pytest.raises(ValueError, match='crop_size'):
    pipeline.build_train_dataset(source(), data_config(crop_size=0), batch_size=2, seed=0)
  with pytest.raises(ValueError, match='empty'):
    empty = source().filter(lambda example: False)
    pipeline.build_train_dataset(empty, data_config(), batch_size=2, seed=0)
  with pytest.raises(ValueError, match='repeats forever'):
    pipeline.build_train_dataset(source().repeat(), data_config(), batch_size=2, seed=0)


@pytest.fixture(scope='module')
def synthetic_config(tmp_path_factory):
  """The project's synthetic TFDS source: 6 train and 5 validation 65x65 scenes."""
  config = data_config(name='synthetic', num_classes=11, skip_bad_examples=False)
  config.data_dir = str(tmp_path_factory.mktemp('tfds'))
  config.synthetic.update(dict(image_size=65, num_train=6, num_val=5))
  return config


def test_synthetic_source_train_batches_and_resume(synthetic_config):
  def batches(process_index, start_step, n, process_count=2):
    dataset = pipeline.create_train_dataset(
      synthetic_config, batch_size=4, seed=4, process_index=process_index,
      process_count=process_count, start_step=start_step)  # fmt: skip
    return take(dataset, n)

  through = batches(1, 0, 5)
  for batch in through:
    assert batch['image'].shape == (2, CROP, CROP, 3) and batch['label'].shape == (2, CROP, CROP)
    assert set(np.unique(batch['label'])) <= set(range(11)) | {255}
    assert np.abs(batch['image']).max() < 3.0  # normalised
  assert_same_batches(through[3:], batches(1, 3, 2))  # 12 examples of 6: epoch 2, offset 0
  # The two processes' rows are the one-process run's batches, decoded from TFDS records.
  whole, first = batches(0, 0, 5, process_count=1), batches(0, 0, 5)
  for one, (a, b) in zip(whole, zip(first, through, strict=True), strict=True):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(one[key], np.concatenate([a[key], b[key]]))


def test_to_global_shards_the_batch_over_the_mesh():
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  batch = {
    'image': np.arange(len(devices) * 6, dtype=np.float32).reshape(len(devices), 2, 3),
    'mask': np.ones(len(devices), bool),
  }
  arrays = pipeline.to_global(batch, mesh)
  assert arrays['image'].shape == batch['image'].shape
  assert arrays['image'].sharding.spec == jax.sharding.PartitionSpec('data')
  assert len(arrays['image'].addressable_shards) == len(devices)
  np.testing.assert_array_equal(np.asarray(arrays['image']), batch['image'])
  np.testing.assert_array_equal(np.asarray(arrays['mask']), batch['mask'])


def noise_source(num=6):
  """Examples of uniform noise (so resizing and blurring give non-integer values)."""
  rng = np.random.default_rng(7)
  images = [rng.integers(0, 256, (40 + 3 * i, 45, 3), np.uint8) for i in range(num)]
  labels = [rng.integers(0, 5, (40 + 3 * i, 45), np.uint8) for i in range(num)]
  return tf.data.Dataset.from_generator(
    lambda: ({'image': i, 'label': lb} for i, lb in zip(images, labels, strict=True)),
    output_signature={
      'image': tf.TensorSpec([None, None, 3], tf.uint8),
      'label': tf.TensorSpec([None, None], tf.uint8),
    },
  )


@pytest.mark.parametrize('recipe', ['official', 'mmseg'])
def test_uint8_transfer_is_the_float32_batch_rounded(recipe):
  """transfer_dtype 'uint8': the same augmentation, the image on 0..255 rounded to uint8."""
  batches = {}
  for dtype in ('float32', 'uint8'):
    config = data_config(recipe=recipe, transfer_dtype=dtype)
    if recipe == 'mmseg':
      config.update(dict(rotate_range=None, blur=False))
      config.mmseg.scale = (64, 48)
    dataset = pipeline.build_train_dataset(noise_source(), config, batch_size=2, seed=3)
    assert dataset.element_spec['image'].dtype == dtype
    batches[dtype] = take(dataset, 3)
  mean = np.asarray(normalization.MEAN_RGB, np.float32)
  std = np.asarray(normalization.STD_RGB, np.float32)
  fractional, fractional_inside = 0, 0
  for exact, rounded in zip(batches['float32'], batches['uint8'], strict=True):
    np.testing.assert_array_equal(exact['label'], rounded['label'])
    raw = exact['image'] * std + mean
    assert rounded['image'].dtype == np.uint8
    # Within half a grey level (and a float32 ulp of the round trip) of the exact image.
    assert np.abs(rounded['image'] - raw).max() <= 0.5 + 1e-3
    off = np.abs(raw - np.round(raw)).max(axis=-1) > 1e-3
    fractional += np.count_nonzero(off)
    fractional_inside += np.count_nonzero(off & (exact['label'] != 255))
  # The official chain's resize and blur make non-integer values: the rounding is real.
  # mmseg's chain is uint8 throughout: only its padding (the mean colour) is not integer.
  if recipe == 'official':
    assert fractional_inside > 0
  else:
    assert fractional_inside == 0
