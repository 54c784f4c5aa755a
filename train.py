"""Trains PSPNet.

  python train.py --config configs/synthetic.py --workdir runs/synthetic
  python train.py --config configs/ade20k.py --workdir runs/ade20k --config.batch_size=8

Every config key can be overridden with --config.KEY=VALUE. Rerunning with the same
--workdir resumes from its newest checkpoint. Several processes (one per host): Cloud TPU
VMs find each other; elsewhere pass --coordinator_address, --num_processes and
--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).

SIGTERM (a preemption notice) or Ctrl-C saves a checkpoint after the current step and exits
with status 0; rerun the same command to resume. A bad config, workdir or data file, or a
non-finite loss, ends the run with status 1 and one message saying what is wrong.
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from psp_jax import distributed, errors, runtime

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and summaries.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')
_STOP_AT_STEP = flags.DEFINE_integer(
  'stop_at_step', None, 'Stop with a checkpoint after this step (rerun to continue).'
)
_CACHE_DIR = flags.DEFINE_string(
  'compilation_cache_dir',
  os.environ.get('JAX_COMPILATION_CACHE_DIR', os.path.expanduser('~/.cache/psp_jax/xla')),
  'Persistent XLA compilation cache: a rerun starts without recompiling. Empty: off.',
)
flags.mark_flags_as_required(['config', 'workdir'])


@errors.report
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.UsageError(f'unexpected arguments: {argv[1:]}')
  # XLA reads its flags when JAX starts a backend: this must come before anything runs.
  if distributed.set_cpu_xla_flags():
    logging.info('CPU run: XLA_FLAGS=%s', os.environ['XLA_FLAGS'])
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if _CACHE_DIR.value:
    jax.config.update('jax_compilation_cache_dir', _CACHE_DIR.value)

  runtime.setup()
  # Imported only now: XLA reads XLA_FLAGS when a backend starts, which importing the model
  # may do, and TensorFlow is imported after runtime.setup quieted it.
  from psp_jax import experiment  # noqa: PLC0415 (after runtime.setup: see above)

  # A bad config, workdir, data file or checkpoint, or a non-finite loss, is a UserError:
  # errors.report prints its message (no traceback) and exits 1; train_and_evaluate has
  # closed the checkpoints and the summary writer by then.
  experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value, stop_at_step=_STOP_AT_STEP.value)


if __name__ == '__main__':
  app.run(main, flags_parser=errors.parse_flags)
