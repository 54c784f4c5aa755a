"""Training input pipeline throughput (images/s) at crop 473 with the full official augmentation.

Rows 1-4 read ADE20K-sized generated examples (short side 512, long side 512-768, ADE20K's
common sizes): JPEG images (quality 90) and PNG labels with 150 classes, in a TFRecord file as
TFDS stores them, decoded in the pipeline as sources.py decodes TFDS JPEGs. Row 5 is the real
create_train_dataset path over the project's psp_synthetic TFDS builder prepared at 512x512
(PNG images, so its decode costs differ); row 6 is that path as one of 8 processes, which
reads every record of the split and decodes and augments its eighth:

  .venv/bin/python benchmarks/input_pipeline.py [--batches 30] [--threads 2]

Warm-up batches (tracing, the first shuffle-buffer fill) are not timed. tf.data runs in its
own thread pool of --threads threads, one thread per op (max_intra_op_parallelism=1); nothing
else runs in this process. On a shared machine the wall-clock column drops with the load;
the CPU time per image does not, and gives the rate the free cores would reach.
"""

import argparse
import os
import sys
import tempfile
import time

from psp_jax import config_schema, runtime

runtime.setup()  # TensorFlow quiet and off accelerators, before it is imported below.

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from psp_jax.data import augment, pipeline  # noqa: E402

# The op-by-op chain is a test helper, not part of the package; row 2 times it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
from augment_reference import augment_reference  # noqa: E402

SIZES = [(512, 683), (683, 512), (512, 512), (512, 768), (768, 512), (512, 640)]


def write_examples(directory: str, num: int, seed: int = 0) -> str:
  """Writes num generated JPEG/PNG examples to one TFRecord file; returns its path."""
  rng = np.random.default_rng(seed)
  path = os.path.join(directory, 'train.tfrecord')
  with tf.io.TFRecordWriter(path) as writer:
    for i in range(num):
      h, w = SIZES[i % len(SIZES)]
      # Smooth colour fields plus noise: JPEG-decode cost close to a natural photo's.
      coarse = rng.uniform(0, 255, (h // 32 + 1, w // 32 + 1, 3)).astype(np.float32)
      image = tf.image.resize(coarse, (h, w)).numpy() + rng.normal(0, 12, (h, w, 3))
      image = np.clip(image, 0, 255).astype(np.uint8)
      blocks = rng.integers(0, 151, (h // 24 + 1, w // 24 + 1, 1)).astype(np.uint8)
      label = tf.image.resize(blocks, (h, w), method='nearest').numpy()
      features = {
        'image': tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[tf.io.encode_jpeg(image, quality=90).numpy()])
        ),
        'label': tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[tf.io.encode_png(label).numpy()])
        ),
      }
      example = tf.train.Example(features=tf.train.Features(feature=features))
      writer.write(example.SerializeToString())
  return path


def decode(record: tf.Tensor) -> dict[str, tf.Tensor]:
  spec = {
    'image': tf.io.FixedLenFeature([], tf.string),
    'label': tf.io.FixedLenFeature([], tf.string),
  }
  parsed = tf.io.parse_single_example(record, spec)
  return {
    # As sources.py decodes TFDS JPEGs: the accurate integer DCT (cv2.imread's).
    'image': tf.io.decode_jpeg(parsed['image'], channels=3, dct_method='INTEGER_ACCURATE'),
    'label': tf.io.decode_png(parsed['label'], channels=1)[..., 0],
  }


def source(path: str, num: int) -> tf.data.Dataset:
  ds = tf.data.TFRecordDataset(path).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.apply(tf.data.experimental.assert_cardinality(num))


def data_config(shuffle_buffer: int, synthetic=None, **extra) -> ml_collections.ConfigDict:
  """The schema's config.data (the official recipe, crop 473), tf.data order not fixed."""
  config = config_schema.get_config().data
  config.update(dict(**extra, crop_size=473, shuffle_buffer=shuffle_buffer, deterministic=False))
  config.synthetic.update(synthetic or {})
  return config


def measure(dataset: tf.data.Dataset, batch: int, warmup: int, batches: int):
  """(images/s wall clock, process CPU ms per image) over `batches` after `warmup`."""
  iterator = iter(dataset)
  for _ in range(warmup):
    next(iterator)
  start, cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(batches):
    tf.nest.map_structure(lambda x: x.numpy(), next(iterator))
  images = batches * batch
  return images / (time.perf_counter() - start), (_cpu_seconds() - cpu) * 1e3 / images


def _cpu_seconds() -> float:
  times = os.times()
  return times.user + times.system


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--examples', type=int, default=96, help='distinct generated examples')
  parser.add_argument('--batch', type=int, default=16, help='per-process batch size')
  parser.add_argument('--batches', type=int, default=30, help='timed batches per row')
  parser.add_argument('--warmup', type=int, default=8, help='untimed batches per row')
  parser.add_argument('--threads', type=int, default=os.cpu_count(), help='tf.data threads')
  parser.add_argument('--synthetic_size', type=int, default=512, help='psp_synthetic image size')
  parser.add_argument(
    '--rate', type=float, default=1000.0, help='images/s a host must deliver (the cores line)'
  )
  args = parser.parse_args()
  config = data_config(shuffle_buffer=args.examples)
  synthetic_options = dict(image_size=args.synthetic_size, num_train=args.examples, num_val=1)

  with tempfile.TemporaryDirectory() as directory:
    path = write_examples(directory, args.examples)
    synthetic = data_config(
      args.examples,
      name='synthetic',
      data_dir=directory,
      train_split='train',
      num_classes=11,
      synthetic=synthetic_options,
    )
    options = pipeline.options(False, args.threads)

    def mapped(fn):
      """source -> repeat -> map(fn(example, per-example seed)) -> batch -> prefetch."""
      ds = source(path, args.examples).repeat().enumerate()
      ds = ds.map(lambda i, e: fn(e, tf.stack([i, 0])), num_parallel_calls=tf.data.AUTOTUNE)
      ds = ds.batch(args.batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
      return ds.with_options(options)

    kwargs = pipeline.augment_kwargs(config)
    plain = {**kwargs, 'scale_range': None, 'rotate_range': None, 'blur': False, 'flip': False}
    rows = [
      ('decode + crop only (no augmentation)', mapped(
        lambda e, s: augment.train_augment(e, s, **plain))),
      ('op-by-op augmentation (augment_reference)', mapped(
        lambda e, s: augment_reference(e, s, **kwargs))),
      ('build_train_dataset (fused train_augment)', pipeline.build_train_dataset(
        source(path, args.examples), config, batch_size=args.batch, seed=0,
        num_threads=args.threads)),
      ('the same, data.transfer_dtype uint8', pipeline.build_train_dataset(
        source(path, args.examples), data_config(args.examples, transfer_dtype='uint8'),
        batch_size=args.batch, seed=0, num_threads=args.threads)),
      (f'create_train_dataset, psp_synthetic {args.synthetic_size}px PNG', lambda: (
        pipeline.create_train_dataset(synthetic, batch_size=args.batch, seed=0,
                                      num_threads=args.threads))),
      ('the same, as process 1 of 8 (decodes 1/8)', lambda: (
        pipeline.create_train_dataset(synthetic, batch_size=8 * args.batch, seed=0,
                                      process_index=1, process_count=8,
                                      num_threads=args.threads))),
    ]  # fmt: skip
    cores = min(args.threads, os.cpu_count() or 1)
    print(
      f'crop 473, batch {args.batch}, {args.examples} ADE20K-sized JPEG/PNG examples, '
      f'tf.data private pool {args.threads} threads, max_intra_op_parallelism 1, '
      f'{os.cpu_count()} cores'
    )
    print(f'| {"pipeline":<46} | images/s | CPU ms/image | images/s, {cores} cores free |')
    print(f'|{"-" * 48}|----------|--------------|{"-" * 24}|')
    cpu = {}
    for name, dataset in rows:
      if callable(dataset):  # built (and the synthetic set prepared) only when its turn comes
        dataset = dataset()
      rate, cpu[name] = measure(dataset, args.batch, args.warmup, args.batches)
      free = cores * 1e3 / cpu[name]
      print(f'| {name:<46} | {rate:8.1f} | {cpu[name]:12.1f} | {free:22.1f} |', flush=True)
    for name in (rows[2][0], rows[3][0]):
      print(
        f'{args.rate:,.0f} images/s with {name}: {args.rate * cpu[name] / 1e3:.1f} cores '
        'of this machine (CPU ms/image x rate; batches of uint8 are a quarter of the bytes '
        'to copy to the devices)'
      )
    print(
      f'Load average {os.getloadavg()[0]:.1f}. "CPU ms/image" is this process\'s CPU time; '
      f'"{cores} cores free" is {cores} / that, the rate with no other process on the cores.'
    )


if __name__ == '__main__':
  main()
