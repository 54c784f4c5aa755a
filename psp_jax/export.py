"""Command line: a checkpoint as a serving artifact (StableHLO, TF SavedModel or ONNX), checked.

  python -m psp_jax.export --checkpoint CKPT --format onnx --size 512x512 --output DIR
      [--batch 1 | --batch dynamic] [--outputs labels|logits|probs] [--overwrite]

CKPT is any checkpoint predict takes (docs/design.md#checkpoints). The artifact takes uint8
RGB images [B, H, W, 3] of the one --size and returns labels int32 [B, H, W] (or float32
logits or probabilities [B, H, W, K]), weights embedded, serving.json beside. It is run by
its own runtime and compared with the in-process model before anything is written to DIR.
See them with `python -m psp_jax.predict --exported DIR --input IMAGES --output PNGS`.
Design: docs/serving.md
"""

import os
from collections.abc import Sequence

from absl import app, flags

from psp_jax import errors, paths, runtime
from psp_jax.serving import contract, deps, exporter

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so importing stays clean."""
  flags.DEFINE_string('checkpoint', None, 'Training workdir, converted weights dir or .pth.')
  flags.DEFINE_enum('format', None, list(contract.FORMATS), 'The artifact format.')
  flags.DEFINE_string('size', None, 'Input HEIGHTxWIDTH in pixels, e.g. 512x512 (fixed).')
  flags.DEFINE_string('batch', '1', "Batch size, or 'dynamic' for any (symbolic batch).")
  flags.DEFINE_enum('outputs', 'labels', list(contract.OUTPUTS), 'What the artifact returns.')
  flags.DEFINE_string('output', None, 'Folder for the artifact and serving.json.')
  flags.DEFINE_list(
    'platforms', ['cpu'], 'stablehlo/savedmodel: lower for these (cpu,cuda,rocm,tpu; cpu needed).'
  )
  flags.DEFINE_string(
    'dataset', None, 'Class names and palette: ade20k, voc2012, cityscapes, synthetic.'
  )
  flags.DEFINE_bool('overwrite', False, 'Replace an artifact already in --output.')


@errors.report
def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise errors.UsageError(f'unexpected arguments: {argv[1:]}')
  for name in ('checkpoint', 'format', 'size', 'output'):
    if getattr(FLAGS, name) is None:
      raise errors.UsageError(f'--{name} is required')
  size = contract.parse_size(FLAGS.size)
  batch = contract.parse_batch(FLAGS.batch)
  platforms = tuple(FLAGS.platforms)
  exporter.check_request(FLAGS.format, FLAGS.outputs, platforms)
  if not paths.is_remote(FLAGS.checkpoint) and not os.path.exists(FLAGS.checkpoint):
    raise errors.NotFoundError(
      f'--checkpoint {FLAGS.checkpoint}: no such file or folder (expected a training workdir, '
      'a converted weights folder or a .pth).'
    )
  # Before the model is loaded: a missing package or a used folder is refused at once.
  deps.require(FLAGS.format)
  exporter.check_output(FLAGS.output, FLAGS.format, FLAGS.overwrite)
  runtime.setup(tensorflow=FLAGS.format == 'savedmodel')
  model = exporter.Exporter.from_checkpoint(FLAGS.checkpoint, dataset=FLAGS.dataset)
  model.export(
    FLAGS.format,
    FLAGS.output,
    size=size,
    batch=batch,
    outputs=FLAGS.outputs,
    platforms=platforms,
    overwrite=FLAGS.overwrite,
  )


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
