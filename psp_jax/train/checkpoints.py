"""A run's orbax checkpoints: the newest TrainStates for resuming, and the best by mIoU.

Layout of a workdir (every checkpoint is self-describing):

  workdir/checkpoints/<step>/state          TrainState {step, params, batch_stats, opt_state}
  workdir/checkpoints/<step>/model_config   PSPNet keyword arguments (JSON)
  workdir/best/<step>/state                 {step, params, batch_stats} of the best validation
  workdir/best/<step>/model_config          mIoU so far (metrics in orbax's step metadata)

Restoring `state` without a target gives nested dicts, so a reader that only wants the
weights takes ['params'] and ['batch_stats'] (psp_jax.weights does).
"""

import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from psp_jax import paths
from psp_jax.train.state import TrainState

ITEMS = ('state', 'model_config')
LATEST_DIR, BEST_DIR = 'checkpoints', 'best'
BEST_METRIC = 'mIoU'
TMP_MARKER = '.orbax-checkpoint-tmp'  # in the name of a checkpoint still being written


class WorkdirError(OSError):
  """A workdir that cannot hold the run (not writable, too little space, another model)."""


def check_workdir(workdir: str) -> None:
  """Creates workdir if needed and checks that this process can write files in it.

  Nothing already in workdir is touched (a probe file of a unique name is written and
  removed). Remote paths (gs://...) are left to the checkpoint library.

  Args:
    workdir: the run's directory.

  Raises:
    WorkdirError: naming the directory and the system's reason.
  """
  if paths.is_remote(workdir):
    return
  probe = os.path.join(workdir, f'.write_probe.{jax.process_index()}.{os.getpid()}')
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise WorkdirError(
      f'Cannot write to --workdir {workdir} ({type(e).__name__}: {e.strerror or e}). Choose '
      'another --workdir, or fix its permissions or file system.'
    ) from e


def check_free_space(workdir: str, checkpoint_bytes: int) -> None:
  """Checks that workdir's file system has room for two more checkpoints.

  A new checkpoint is written beside the old ones (which are deleted only once it is
  complete), and the best weights may be saved at the same step.

  Args:
    workdir: the run's directory (must exist).
    checkpoint_bytes: bytes of one TrainState checkpoint.

  Raises:
    WorkdirError: with the free and the needed space.
  """
  if paths.is_remote(workdir):
    return
  free, need = shutil.disk_usage(workdir).free, 2 * checkpoint_bytes
  if free < need:
    raise WorkdirError(
      f'--workdir {workdir} has {free / 2**20:.1f} MiB free, but a checkpoint of this model '
      f'takes {checkpoint_bytes / 2**20:.1f} MiB and training needs room for two '
      f'({need / 2**20:.1f} MiB). Free some space or choose another --workdir.'
    )


def unfinished(directory: str) -> list[str]:
  """Checkpoints under directory that were never completed (a save killed mid-way).

  Orbax writes a checkpoint to `<step>.orbax-checkpoint-tmp...` and renames it to `<step>`
  only when every file is on disk, so these are never restored; a new save of the same step
  replaces them.
  """
  if paths.is_remote(directory) or not os.path.isdir(directory):
    return []
  return sorted(n for n in os.listdir(directory) if TMP_MARKER in n)


class Checkpoints:
  """The last `keep` TrainStates of a run and its best weights by validation mIoU.

  Saves are asynchronous: arrays are copied to host memory before save() returns (so the
  state may be donated to the next step at once) and written in the background.
  """

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    workdir = paths.as_path(workdir)
    self.latest = ocp.CheckpointManager(
      workdir / LATEST_DIR,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save),
      item_names=ITEMS,
    )
    for directory in (self.latest.directory, workdir / BEST_DIR):
      partial = unfinished(str(directory))
      if partial:
        logging.warning(
          'Ignoring %d unfinished checkpoint(s) in %s (a save was interrupted): %s.',
          len(partial),
          directory,
          ', '.join(partial),
        )
    self.best = ocp.CheckpointManager(
      workdir / BEST_DIR,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda m: m[BEST_METRIC],
        best_mode='max',
        keep_checkpoints_without_metrics=False,
        enable_async_checkpointing=async_save,
      ),
      item_names=ITEMS,
    )

  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, None if there is none.

    A checkpoint whose save was interrupted (process killed, machine lost) is not complete
    and never counts (the constructor logs it).
    """
    return self.latest.latest_step()

  def restore(self, target: TrainState, step: int | None = None) -> TrainState:
    """The TrainState of `step` (default: newest), placed as target's shardings say.

    Args:
      target: TrainState of jax.ShapeDtypeStruct with shardings (train_state.abstract_state).
      step: checkpoint step.
    """
    step = self.latest.latest_step() if step is None else step
    restored = self.latest.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )
    return restored['state']

  def model_config(self, step: int | None = None) -> dict[str, Any]:
    """The model_config saved with a checkpoint."""
    step = self.latest.latest_step() if step is None else step
    restored = self.latest.restore(
      step, args=ocp.args.Composite(model_config=ocp.args.JsonRestore())
    )
    return restored['model_config']

  def save(self, state: TrainState, model_config: dict[str, Any]) -> None:
    """Saves the state at its step (every process must call it)."""
    step = int(jax.device_get(state.step))
    if step in self.latest.all_steps():
      return
    self.latest.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), model_config=ocp.args.JsonSave(model_config)
      ),
      force=True,
    )

  def best_value(self) -> float | None:
    """Validation mIoU of the best checkpoint so far (None if none)."""
    step = self.best.best_step()
    if step is None:
      return None
    value = (self.best.metrics(step) or {}).get(BEST_METRIC)
    return None if value is None else float(value)

  def save_if_best(
    self, state: TrainState, model_config: dict[str, Any], scalars: dict[str, float]
  ) -> bool:
    """Saves the weights if scalars['mIoU'] beats the best so far; True if it did."""
    best = self.best_value()
    if best is not None and scalars[BEST_METRIC] <= best:
      return False
    step = int(jax.device_get(state.step))
    if step in self.best.all_steps():
      return False
    weights = {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats}
    self.best.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(weights), model_config=ocp.args.JsonSave(model_config)
      ),
      metrics={k: float(v) for k, v in scalars.items()},
      force=True,
    )
    return True

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the managers."""
    self.latest.close()
    self.best.close()
