"""Runs train.py with a fault injected, for the tests: `python tests/faults.py TRAIN_ARGS...`.

The faults are chosen by environment variables, read here only (train.py knows nothing):

  FAULT_NAN_AT_STEP=N      the images of step N (1-based) become NaN inside the compiled
                           step, so its loss is NaN as a numerical blow-up would make it;
  FAULT_HANG_SAVE_AT_STEP=N  the save of checkpoint N writes every file, then hangs just
                           before orbax renames it into place, after touching the file
                           FAULT_MARKER; a test then kills the process with SIGKILL.
"""

import os
import pathlib
import runpy
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def poison_step(step: int) -> None:
  """Makes train_step.make_train_step's step feed NaN images at optimiser step `step`."""
  import jax.numpy as jnp

  from psp_jax.train import step as train_step

  make = train_step.make_train_step

  def make_poisoned(*args, **kwargs):
    inner = make(*args, **kwargs)

    def poisoned(state, batch, rng):
      image = jnp.where(state.step + 1 == step, jnp.nan, batch['image'])
      return inner(state, dict(batch, image=image), rng)

    return poisoned

  train_step.make_train_step = make_poisoned


def hang_save(step: int, marker: str) -> None:
  """Makes the commit of checkpoints/<step> hang forever once its files are written."""
  from orbax.checkpoint._src.path import atomicity

  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize_or_hang(self):
    final = self.get_final()
    if final.name == str(step) and final.parent.name == 'checkpoints':
      pathlib.Path(marker).write_text(str(self.get()))
      while True:  # Blocks the commit thread; the main thread waits for it at exit.
        time.sleep(1)
    return await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_hang


def main() -> None:
  if 'FAULT_NAN_AT_STEP' in os.environ:
    poison_step(int(os.environ['FAULT_NAN_AT_STEP']))
  if 'FAULT_HANG_SAVE_AT_STEP' in os.environ:
    hang_save(int(os.environ['FAULT_HANG_SAVE_AT_STEP']), os.environ['FAULT_MARKER'])
  train_py = str(ROOT / 'train.py')
  sys.argv = [train_py, *sys.argv[1:]]
  sys.path.insert(0, str(ROOT))
  runpy.run_path(train_py, run_name='__main__')


if __name__ == '__main__':
  main()
