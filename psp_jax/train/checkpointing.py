"""A run's orbax checkpoints: the newest TrainStates for resuming, and the best by mIoU.

Every checkpoint is self-describing (state + model_config); one damaged after it was written
is moved aside when resuming (Checkpoints.restore_newest). The workdir's layout and the
other checkpoint kinds: docs/design.md#checkpoints
"""

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from psp_jax import digests, distributed, orbax_reads, paths, weights
from psp_jax.train import storage
from psp_jax.train.train_state import TrainState

# Also the keywords of the ocp.args.Composite saves and restores below.
ITEMS = (weights.STATE_ITEM, weights.MODEL_CONFIG_ITEM, digests.ITEM)
BEST_METRIC = 'mIoU'
TMP_MARKER = '.orbax-checkpoint-tmp'  # in the name of a checkpoint still being written
# Appended to a damaged step's directory: orbax takes only integer names for steps, so it
# neither lists nor deletes the moved one.
DAMAGED_SUFFIX = '.damaged'
# How long close() waits for the writes a failed save left running (each stops at its error).
ABANDONED_WRITES_S = 60


class DamagedRunError(weights.DamagedCheckpointError, storage.WorkdirError):
  """A run that cannot resume: no checkpoint of it can be read, or one cannot be moved aside."""


def unfinished(directory: str) -> list[str]:
  """Checkpoints under directory that were never completed (a save killed mid-way).

  Orbax writes a checkpoint to `<step>.orbax-checkpoint-tmp...` and renames it to `<step>`
  only when every file is on disk, so these are never restored; a new save of the same step
  replaces them.
  """
  if paths.is_remote(directory) or not os.path.isdir(directory):
    return []
  return sorted(n for n in os.listdir(directory) if TMP_MARKER in n)


def damaged(directory: str | os.PathLike) -> list[str]:
  """Names of the step directories under directory that were moved aside as damaged."""
  directory = paths.as_path(directory)
  if not directory.is_dir():
    return []
  return sorted(p.name for p in directory.iterdir() if DAMAGED_SUFFIX in p.name)


def _anywhere(failed: bool) -> bool:
  """Whether a read failed in this process or any other: all must skip the same step."""
  if jax.process_count() == 1:
    return failed
  return bool(np.any(distributed.allgather(np.int32(failed), 'checkpoint read')))


def _tree_differences(saved: Any, target: TrainState) -> list[str]:
  """'path: checkpoint SHAPE, config SHAPE' for the first arrays that differ (dtypes may)."""

  def shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat = ocp.tree.to_flat_dict(tree, sep='/')
    return {k: tuple(v.shape) for k, v in flat.items() if hasattr(v, 'shape')}

  # keep_empty_nodes: an optax EmptyState in a chain keeps the indices of the states after it.
  have, want = shapes(saved), shapes(ocp.tree.serialize_tree(target, keep_empty_nodes=True))
  keys = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
  shown = [f'{k}: checkpoint {have.get(k, "none")}, config {want.get(k, "none")}' for k in keys]
  return shown[:3] + ([f'{len(keys) - 3} more'] if len(keys) > 3 else [])


def _items(tree: Any, model_config: dict[str, Any]) -> ocp.args.Composite:
  """A step's ITEMS: the tree, its model_config and the tree's digests, in one orbax commit."""
  return ocp.args.Composite(
    state=ocp.args.StandardSave(tree),
    model_config=ocp.args.JsonSave(model_config),
    digests=ocp.args.JsonSave(digests.of_tree(tree)),
  )


def _join_abandoned_writes() -> None:
  """Waits (ABANDONED_WRITES_S at most) for orbax's threads a failed save left running.

  A save that runs out of space fails at its first write while its other writes go on in
  orbax's commit threads, which the managers' close() does not wait for; a process exiting
  under them makes them fail at interpreter shutdown ('cannot schedule new futures after
  interpreter shutdown'), and orbax logs that with a traceback after the run's one message
  (tests/test_full_disk.py, once in the suite of 2026-12-07).
  """
  deadline = time.monotonic() + ABANDONED_WRITES_S
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and type(thread).__module__.startswith('orbax.'):
      # Thread's own join: orbax's re-raises the thread's error (the full disk, reported).
      threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))


class Checkpoints:
  """The last `keep` TrainStates of a run and its best weights by validation mIoU.

  Saves are asynchronous: arrays are copied to host memory before save() returns (so the
  state may be donated to the next step at once) and written in the background.
  """

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    workdir = paths.as_path(workdir)
    self.workdir, self.keep = workdir, keep
    self._sizes = (0, 0)  # Bytes of a TrainState and of best/'s weights, once saved.
    self._disk_full = False
    storage.quiet_disk_full_logs()
    # A failed save or restore abandons tensorstore's other reads and writes, whose threads
    # then report into orbax's closed event loop: dropped from the start, as they can come
    # before the error reaches this code.
    orbax_reads.quiet_abandoned_reads()
    # Each manager's barriers get their own names: at a step that is saved and also the best
    # (a validation step), both write step N at once, and with one name for both barriers
    # the processes of a multi-host run failed with "Barrier _async_write_complete.N is
    # already ongoing" (seen on 2 CPU processes under load).
    self.latest = ocp.CheckpointManager(
      workdir / weights.LATEST_DIR,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix='latest'
        ),
      ),
      item_names=ITEMS,
    )
    for directory in (self.latest.directory, workdir / weights.BEST_DIR):
      partial = unfinished(str(directory))
      if partial:
        logging.warning(
          'Ignoring %d unfinished checkpoint(s) in %s (a save was interrupted): %s.',
          len(partial),
          directory,
          ', '.join(partial),
        )
    self.best = ocp.CheckpointManager(
      workdir / weights.BEST_DIR,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=1,
        best_fn=lambda m: m[BEST_METRIC],
        best_mode='max',
        keep_checkpoints_without_metrics=False,
        enable_async_checkpointing=async_save,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix='best'),
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

    Its arrays are checked against the digests saved with them (digests.py); one written
    before digests existed is used unchecked, with a warning.

    Args:
      target: TrainState of jax.ShapeDtypeStruct with shardings (train_state.abstract_state).
      step: checkpoint step.

    Raises:
      weights.DamagedCheckpointError: an array differs from its digest (changed on disk).
    """
    step = self.latest.latest_step() if step is None else step
    restored = self.latest.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )
    weights.verify(restored['state'], self.latest.directory / str(step))
    return restored['state']

  def restore_newest(
    self,
    target: TrainState,
    check_config: Callable[[int, dict[str, Any]], None] = lambda step, config: None,
  ) -> TrainState | None:
    """The newest TrainState that reads whole; damaged checkpoints are moved aside.

    Newest first, a checkpoint's model_config is read and given to check_config, then its
    state. One that cannot be read (any error of orbax, tensorstore or the file system: a
    file truncated, garbled or deleted) is renamed `<step>.damaged`, never deleted, with one
    warning, and the next older one is tried. A restore that succeeds has read every array
    of target (orbax reads each leaf and fails on missing data rather than filling it).

    Args:
      target: TrainState of jax.ShapeDtypeStruct with shardings (train_state.abstract_state).
      check_config: (step, model_config) -> None, raising to refuse the checkpoint (another
        model) before its state is read.

    Returns:
      The restored TrainState, or None when the run has no checkpoint, damaged or not.

    Raises:
      storage.WorkdirError: a readable state whose arrays are not target's (another optimiser or
        TrainState); nothing is moved, as for another model.
      DamagedRunError: every checkpoint is damaged (starting over would overwrite the run),
        or a damaged one cannot be moved aside.
    """
    for step in self.latest.all_steps()[::-1]:
      saved = self._read_or_move_aside(step, self._saved, step)
      if saved is None:
        continue
      config, saved_tree = saved
      check_config(step, config)
      differences = _tree_differences(saved_tree, target)
      if differences:
        raise storage.WorkdirError(
          f'{self.latest.directory / str(step)} holds a TrainState of other arrays than this '
          f'config makes ({"; ".join(differences)}): use the config that wrote it, or a new '
          '--workdir. The checkpoint was left as it is.'
        )
      state = self._read_or_move_aside(step, self.restore, target, step)
      if state is not None:
        return state
    moved = damaged(self.latest.directory)
    if moved:
      raise DamagedRunError(
        f'No checkpoint in {self.latest.directory} can be read: {", ".join(moved)} were moved '
        'aside as damaged. Starting over would overwrite this run: to do that, use a new '
        '--workdir, or move its checkpoints/ and best/ away; to retry one, rename it back to its '
        'step number.'
      )
    return None

  def _saved(self, step: int) -> tuple[dict[str, Any], Any]:
    """(model_config, array metadata tree of the state) of a checkpoint, once its arrays read
    whole (orbax_reads.check_readable)."""
    config = self.model_config(step)
    tree_dir = self.latest.directory / str(step) / weights.STATE_ITEM
    orbax_reads.check_readable(tree_dir)  # Before orbax reads any of it: see check_readable.
    # The handler, not a Checkpointer: that one warns about a step metadata file `state/`
    # never has.
    handler = ocp.PyTreeCheckpointHandler()
    try:
      return config, handler.metadata(tree_dir).tree
    finally:
      handler.close()

  def _read_or_move_aside(self, step: int, read: Callable[..., Any], *args: Any) -> Any:
    """read(*args), or None once the step is moved aside because the read failed anywhere."""
    try:
      value, error = read(*args), None
    except Exception as e:  # orbax raises a bare Exception for an unreadable array.
      value, error = None, e  # What it abandoned is quiet: __init__ installed the hooks.
    if _anywhere(error is not None):
      self._move_aside(step, error)
      return None
    return value

  def _move_aside(self, step: int, error: BaseException | None) -> None:
    """Renames checkpoints/<step> to a free <step>.damaged name and forgets the step."""
    source = self.latest.directory / str(step)
    aside, n = source.parent / f'{step}{DAMAGED_SUFFIX}', 1
    while aside.exists():  # Damaged before, at the same step: keep both.
      n += 1
      aside = source.parent / f'{step}{DAMAGED_SUFFIX}.{n}'
    why = 'unreadable on another process' if error is None else weights.reason(error)
    if jax.process_index() == 0:  # One rename of the shared directory.
      try:
        source.rename(aside)
      except OSError as e:
        raise DamagedRunError(
          f'Checkpoint {source} cannot be read ({why}) nor moved aside ({e}): move it away '
          'yourself and rerun to resume from the one before it.'
        ) from e
    distributed.meet(f'moved checkpoint {step} aside')
    self.latest.reload()  # The manager lists its steps once, when it is created.
    logging.warning(
      'Checkpoint step %d cannot be read (%s): moved to %s; trying the one before it.',
      step,
      why,
      aside,
    )

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
    self._sizes = (storage.nbytes(state), storage.nbytes(state.variables))
    with self._writing():
      self.latest.save(step, args=_items(state, model_config), force=True)

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
    kept = {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats}
    with self._writing():
      self.best.save(
        step,
        args=_items(kept, model_config),
        metrics={k: float(v) for k, v in scalars.items()},
        force=True,
      )
    return True

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    with self._writing():
      self.latest.wait_until_finished()
      self.best.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the managers.

    A full disk already reported (a DiskFullError raised before) is not raised again.
    """
    reported, error = self._disk_full, None
    for manager in (self.latest, self.best):
      try:
        with self._writing():
          manager.close()
      except storage.DiskFullError as e:
        error = error or e
    if self._disk_full:  # Again, now that orbax's threads are done with them.
      _join_abandoned_writes()
      self._remove_unfinished()
    if error is not None and not reported:
      raise error

  @contextlib.contextmanager
  def _writing(self) -> Iterator[None]:
    """Turns a save that ran out of space (orbax's threads or ours) into one DiskFullError.

    The half-written step directories are removed (a restore never reads them; their space
    is the user's), so the newest complete checkpoint is what a rerun resumes from.
    """
    try:
      yield
    except Exception as e:
      if not storage.disk_full(e):
        raise
      self._disk_full = True
      raise self._disk_full_error() from None

  def _remove_unfinished(self) -> list[str]:
    """Removes the half-written step directories (process 0); 'checkpoints/6', ... of them."""
    removed = []
    for directory in (self.latest.directory, self.workdir / weights.BEST_DIR):
      for name in unfinished(str(directory)):
        if jax.process_index() == 0:
          shutil.rmtree(os.path.join(str(directory), name), ignore_errors=True)
        removed.append(f'{directory.name}/{name.split(TMP_MARKER)[0]}')
    return removed

  def _disk_full_error(self) -> storage.DiskFullError:
    removed = self._remove_unfinished()
    self.latest.reload()
    state_bytes, best_bytes = self._sizes
    need, how = storage.space_needed(str(self.workdir), state_bytes, best_bytes, self.keep)
    remote = paths.is_remote(str(self.workdir))
    free = 0.0 if remote else shutil.disk_usage(str(self.workdir)).free / 2**20
    latest = self.latest.latest_step()
    kept = (
      f'The newest complete checkpoint, step {latest}, is intact: free some space (or lower '
      '--config.keep_checkpoints) and rerun the same command to resume from it.'
      if latest is not None
      else 'No checkpoint was complete yet: free some space and rerun to start the run.'
    )
    written = f' ({", ".join(removed)}: half-written, never read)' if removed else ''
    return storage.DiskFullError(
      f'The disk of --workdir {self.workdir} is full: a checkpoint could not be written'
      f'{written}. {free:.1f} MiB free now; the run needs {need / 2**20:.1f} MiB more: '
      f'{how}. {kept}'
    )
