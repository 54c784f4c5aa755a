"""Prepares a data set as TFDS files, once, from its manually downloaded files (no network).

  python -m psp_jax.data.prepare ade20k --manual_dir ~/data --data_dir ~/tensorflow_datasets
  python -m psp_jax.data.prepare voc2012 --manual_dir ~/data/VOCdevkit
  python -m psp_jax.data.prepare cityscapes --manual_dir ~/data/cityscapes
  python -m psp_jax.data.prepare synthetic [--num_train 2000 --image_size 129 --seed 0]

Then train or evaluate with --config.data.name=NAME --config.data.data_dir=DATA_DIR (the
TFDS default ~/tensorflow_datasets when unset). Every image and label is decoded and checked
on the way: a corrupt file, a label of another size or an unexpected label value stops the
run naming the file (--skip_bad_examples logs and drops such examples instead).
"""

import argparse
import logging
import os
import sys
import time

from psp_jax import errors, runtime

runtime.quiet_tensorflow_env()  # A command line: before anything below imports TensorFlow.

import tensorflow_datasets as tfds  # noqa: E402

from psp_jax.data.builders import BUILDERS, MissingDataError  # noqa: E402
from psp_jax.data.builders import synthetic as synthetic_builder  # noqa: E402
from psp_jax.data.builders.common import is_prepared  # noqa: E402


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog='python -m psp_jax.data.prepare',
    description=__doc__.split('\n')[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog='\n'.join(
      f'{name}: --manual_dir must hold {cls.EXPECTED}.' for name, cls in BUILDERS.items()
    ),
  )
  parser.add_argument('name', choices=[*BUILDERS, 'synthetic'])
  parser.add_argument('--manual_dir', help='folder with the downloaded files (not synthetic)')
  parser.add_argument('--data_dir', default=None, help='TFDS data_dir (~/tensorflow_datasets)')
  parser.add_argument('--skip_bad_examples', action='store_true', help='log and drop bad files')
  parser.add_argument('--num_workers', type=int, default=None, help='decoding threads')
  group = parser.add_argument_group('synthetic')
  group.add_argument('--image_size', type=int, default=129)
  group.add_argument('--num_train', type=int, default=2000)
  group.add_argument('--num_val', type=int, default=200)
  group.add_argument('--seed', type=int, default=0)
  return parser


def prepare(args: argparse.Namespace) -> dict[str, int]:
  """Prepares args.name; returns the number of examples of each split."""
  if args.name == 'synthetic':
    config = synthetic_builder.make_config(args.image_size, args.num_train, args.num_val, args.seed)
    builder = synthetic_builder.Synthetic(
      data_dir=args.data_dir, config=config, num_workers=args.num_workers
    )
    download_config = tfds.download.DownloadConfig()
    print(f'Generating the synthetic data set ({config.description}).', flush=True)
  else:
    if not args.manual_dir:
      raise MissingDataError(
        f'{args.name} needs --manual_dir DIR, where DIR holds {BUILDERS[args.name].EXPECTED}.'
      )
    # Fails early, naming what is missing, before TFDS starts.
    splits = BUILDERS[args.name].locate(args.manual_dir, skip_bad_examples=args.skip_bad_examples)
    found = ', '.join(f'{len(pairs)} {split}' for split, pairs in splits.items())
    print(f'{args.name}: found {found} image/label pairs in {args.manual_dir}.', flush=True)
    builder = BUILDERS[args.name](
      data_dir=args.data_dir,
      skip_bad_examples=args.skip_bad_examples,
      num_workers=args.num_workers,
    )
    download_config = tfds.download.DownloadConfig(manual_dir=args.manual_dir)
  if is_prepared(builder):
    print(f'Already prepared in {builder.data_dir}; delete that folder to prepare it again.')
  else:
    checking = '' if args.name == 'synthetic' else ' (decoding and checking every file)'
    print(f'Writing {builder.data_dir}{checking} ...', flush=True)
    builder.download_and_prepare(download_config=download_config)
  counts = {split: info.num_examples for split, info in builder.info.splits.items()}
  print(f'{args.name}: {counts} in {builder.data_dir}')
  return counts


@errors.report
def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  runtime.setup()
  for key in ('manual_dir', 'data_dir'):
    if getattr(args, key):
      setattr(args, key, os.path.expanduser(getattr(args, key)))
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  start = time.perf_counter()
  prepare(args)  # A missing or bad file is a UserError: one message, status 1.
  print(f'Done in {time.perf_counter() - start:.1f} s.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
