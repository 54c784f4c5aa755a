"""A run's orbax checkpoints: the newest TrainStates for resuming, and the best by mIoU.

Layout of a workdir (every checkpoint is self-describing):

  workdir/checkpoints/<step>/state          TrainState {step, params, batch_stats, opt_state}
  workdir/checkpoints/<step>/model_config   PSPNet keyword arguments (JSON)
  workdir/best/<step>/state                 {step, params, batch_stats} of the best validation
  workdir/best/<step>/model_config          mIoU so far (metrics in orbax's step metadata)

Restoring `state` without a target gives nested dicts, so a reader that only wants the
weights takes ['params'] and ['batch_stats'] (psp_jax.checkpoint_io does).
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from psp_jax.train_state import TrainState

ITEMS = ('state', 'model_config')
LATEST_DIR, BEST_DIR = 'checkpoints', 'best'
BEST_METRIC = 'mIoU'


class Checkpoints:
  """The last `keep` TrainStates of a run and its best weights by validation mIoU.

  Saves are asynchronous: arrays are copied to host memory before save() returns (so the
  state may be donated to the next step at once) and written in the background.
  """

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    workdir = os.path.abspath(workdir)
    self.latest = ocp.CheckpointManager(
      os.path.join(workdir, LATEST_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save),
      item_names=ITEMS,
    )
    self.best = ocp.CheckpointManager(
      os.path.join(workdir, BEST_DIR),
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
    """Step of the newest complete checkpoint, None if there is none."""
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
