"""Command line: label maps, colour masks and overlays of images (inference.segmenter).

  python -m psp_jax.predict --checkpoint CKPT --input IMAGE_OR_FOLDER --output DIR
  python -m psp_jax.predict --exported ARTIFACT --input IMAGE_OR_FOLDER --output DIR

writes, for each image NAME, NAME.png (class indices, like tool/test.py's gray output),
NAME_color.png (the data set's palette) and NAME_overlay.png (blend with a legend of the
classes present). --exported runs an artifact of python -m psp_jax.export instead (any
format, at its fixed size: psp_jax.serving.artifact). In a notebook,
psp_jax.inference.segmenter.Segmenter does the same in memory.
"""

import pathlib
from collections.abc import Sequence

from absl import app, flags

from psp_jax import errors, paths, runtime
from psp_jax.inference.segmenter import (
  OUTPUT_SUFFIXES,
  Segmenter,
  list_images,
  output_name,
  predict_files,
)
from psp_jax.serving.artifact import ExportedSegmenter

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so importing stays clean."""
  flags.DEFINE_string('checkpoint', None, 'Training workdir, converted checkpoint dir or .pth.')
  flags.DEFINE_string(
    'exported', None, 'Instead of --checkpoint: an artifact folder of python -m psp_jax.export.'
  )
  flags.DEFINE_string('input', None, 'An image or a folder of images.')
  flags.DEFINE_string('output', None, 'Folder for the PNGs.')
  flags.DEFINE_string(
    'dataset',
    None,
    'Palette and class names: ade20k, voc2012, cityscapes, synthetic (default: those the '
    'checkpoint came with, as an mmseg .pth meta, else its training data set).',
  )
  flags.DEFINE_list('scales', None, 'Scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75 (default 1.0).')
  flags.DEFINE_enum(
    'mode',
    None,
    ['slide', 'whole'],
    'Sliding window or whole (default: slide, as official; whole for an mmseg model).',
  )
  flags.DEFINE_bool(
    'flip', None, 'Average with the horizontal flip (default: on as official, off for mmseg).'
  )
  flags.DEFINE_integer('base_size', None, 'Long side at scale 1.0 (default: the data set).')
  flags.DEFINE_integer('crop_size', None, 'Window side (default: the data set).')
  flags.DEFINE_bool('overwrite', False, 'Replace PNGs already in --output.')


@errors.report
def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise errors.UsageError(f'unexpected arguments: {argv[1:]}')
  for name in ('input', 'output'):
    if getattr(FLAGS, name) is None:
      raise errors.UsageError(f'--{name} is required')
  if (FLAGS.checkpoint is None) == (FLAGS.exported is None):
    raise errors.UsageError('pass one of --checkpoint (a model) and --exported (an artifact)')
  overrides = {
    k: v
    for k, v in dict(
      scales=tuple(float(s) for s in FLAGS.scales) if FLAGS.scales else None,
      mode=FLAGS.mode,
      flip=FLAGS.flip,
      base_size=FLAGS.base_size,
      crop_size=FLAGS.crop_size,
    ).items()
    if v is not None
  }
  if FLAGS.exported and (overrides or FLAGS.dataset):
    given = ', '.join(f'--{k}' for k in [*overrides, *(['dataset'] if FLAGS.dataset else [])])
    raise errors.UsageError(
      f'{given}: not for --exported, whose size, procedure and classes are fixed at export.'
    )
  runtime.setup(tensorflow=False)  # predict reads images with PIL: no tf.data
  files = list_images(FLAGS.input)
  root = pathlib.Path(FLAGS.input) if pathlib.Path(FLAGS.input).is_dir() else None
  outputs = [output_name(f, root) + suffix for f in files for suffix in OUTPUT_SUFFIXES]
  paths.check_output_dir(FLAGS.output, flag='--output', files=outputs, overwrite=FLAGS.overwrite)
  if FLAGS.exported:
    seg = ExportedSegmenter.open(FLAGS.exported)
  else:
    seg = Segmenter.from_checkpoint(FLAGS.checkpoint, dataset=FLAGS.dataset, **overrides)
  predict_files(seg, files, FLAGS.output, root=root)
  print(f'wrote {3 * len(files)} PNGs for {len(files)} images to {FLAGS.output}')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
