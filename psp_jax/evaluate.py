"""Command line: evaluate a checkpoint on a split with the official protocol (tool/test.py).

  python -m psp_jax.evaluate --config configs/ade20k.py --checkpoint runs/ade20k \\
      [--output_dir DIR] [--config.eval.scales='(0.5,0.75,1.0,1.25,1.5,1.75)'] \\
      [--config.eval.mode=whole] [--config.eval.flip=False] [--config.eval.protocol=mmseg]
  python -m psp_jax.evaluate --config configs/mmseg_ade20k.py --checkpoint ZOO_FILE.pth
      # mmsegmentation's test (eval.resize=fit, average=logits, no flip, nanmean mIoU)

prints mIoU / mAcc / allAcc and a per-class table, and writes results.{txt,md,json} to
--output_dir. The checkpoint is of any kind (docs/design.md#checkpoints), a .pth converted
on the fly. psp_jax.inference.evaluation does the work.
"""

from collections.abc import Sequence

from psp_jax import errors, paths, runtime

runtime.quiet_tensorflow_env()  # A command line: before anything below imports TensorFlow.

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from psp_jax.inference import evaluation  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so importing stays clean."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.')
  flags.DEFINE_string('checkpoint', None, 'Training workdir, converted checkpoint dir or .pth.')
  flags.DEFINE_string('output_dir', None, 'Where to write results.{txt,md,json}.')
  flags.DEFINE_bool('overwrite', False, 'Replace results already in --output_dir.')


@errors.report
def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise errors.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.config is None or FLAGS.checkpoint is None:
    raise errors.UsageError('--config and --checkpoint are required')
  if FLAGS.output_dir:  # Refused now, not after the evaluation's minutes.
    paths.check_output_dir(
      FLAGS.output_dir,
      flag='--output_dir',
      files=evaluation.RESULT_FILES,
      overwrite=FLAGS.overwrite,
    )
  runtime.setup()
  results = evaluation.evaluate(FLAGS.config, FLAGS.checkpoint)
  if jax.process_index() == 0:
    print(evaluation.format_text(results))
    if FLAGS.output_dir:
      evaluation.write_results(results, FLAGS.output_dir)
      print(f'wrote {FLAGS.output_dir}/results.{{txt,md,json}}')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
