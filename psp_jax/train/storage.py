"""A run's workdir on its disk: writable, room for every copy the run keeps, a disk that fills.

check_workdir and check_free_space run before anything is compiled; a save that runs out
of space later is one DiskFullError (psp_jax.train.checkpointing raises it), and the
libraries' own logs of it (orbax's and clu's threads, asyncio's abandoned tasks) are
dropped by quiet_disk_full_logs, so that the user reads one message.
"""

import errno
import logging
import os
import shutil
from typing import Any

import jax

from psp_jax import errors, paths, weights

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or a full quota


class WorkdirError(errors.UserError, OSError):
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


def space_needed(
  workdir: str, state_bytes: int, best_bytes: int, keep: int, events_bytes: int = 0
) -> tuple[int, str]:
  """(bytes the run still needs on workdir's disk, how they add up) for every copy it keeps.

  A run keeps `keep` TrainStates and writes each new one beside them before the oldest goes
  (keep + 1 at a time), and best/ likewise (two at a time); the copies already in workdir
  count as written. Plus events_bytes (TensorBoard: summaries.events_bytes).
  """
  root = paths.as_path(workdir)
  have_steps = len(weights.step_numbers(root / weights.LATEST_DIR))
  have_best = len(weights.step_numbers(root / weights.BEST_DIR))
  steps, best = max(0, keep + 1 - have_steps), max(0, 2 - have_best)
  need = steps * state_bytes + best * best_bytes + events_bytes
  mib = 2**20
  how = (
    f'{steps} x {state_bytes / mib:.1f} MiB of checkpoints (it keeps {keep} and writes each '
    f'new one before the oldest goes), {best} x {best_bytes / mib:.1f} MiB of best/ weights'
  )
  if events_bytes:
    how += f', {events_bytes / mib:.1f} MiB of TensorBoard events (an estimate)'
  return need, how


def nbytes(tree: Any) -> int:
  """Bytes of a tree's arrays (or of jax.ShapeDtypeStructs), as a checkpoint stores them."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def check_free_space(workdir: str, need: int, how: str) -> None:
  """Checks that workdir's file system has `need` bytes free (space_needed's figures).

  Raises:
    WorkdirError: with the free and the needed space, and how the need adds up.
  """
  if paths.is_remote(workdir):
    return
  free = shutil.disk_usage(workdir).free
  if free < need:
    raise WorkdirError(
      f'--workdir {workdir} has {free / 2**20:.1f} MiB free, but this run needs '
      f'{need / 2**20:.1f} MiB more: {how}. Free some space, lower --config.keep_checkpoints, '
      'or choose another --workdir.'
    )


class DiskFullError(WorkdirError):
  """The workdir's disk filled while the run was writing a checkpoint."""


def disk_full(error: BaseException | None) -> bool:
  """Whether error, or one it was raised from or during, is 'no space' (ENOSPC, EDQUOT):
  an OSError's errno, or tensorstore's or TensorFlow's error saying it."""
  for e in errors.chain(error):
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
      return True
    # tensorstore's ValueError and TensorFlow's ResourceExhaustedError say it in words.
    if not isinstance(e, OSError) and any(os.strerror(c) in str(e) for c in _NO_SPACE):
      return True
  return False


def _not_disk_full(record: logging.LogRecord) -> bool:
  """False (drop it) for a library's log of a write that ran out of space (orbax's, clu's,
  an abandoned asyncio task's): the run reports it as one DiskFullError instead."""
  error = record.exc_info[1] if record.exc_info else None
  return not disk_full(error)


def quiet_disk_full_logs() -> None:
  """Drops the libraries' logs of a write that ran out of space (once per process)."""
  # orbax and clu (TensorBoard) log through absl.logging from their threads, and asyncio
  # the errors of orbax's abandoned write tasks.
  for name in ('absl', 'asyncio'):
    if _not_disk_full not in logging.getLogger(name).filters:
      logging.getLogger(name).addFilter(_not_disk_full)
