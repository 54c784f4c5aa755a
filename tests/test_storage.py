"""The workdir's disk (psp_jax.train.storage): what a run needs, and a save that finds it full.

In process, with orbax's save made to fail as a full disk makes it; tests/test_full_disk.py
fills a real (tmpfs) disk under train.py.
"""

import errno
import logging
import os

import jax.numpy as jnp
import optax
import pytest

from psp_jax.train import checkpointing, storage
from psp_jax.train.train_state import TrainState

MODEL_CONFIG = {'num_classes': 3, 'depth': 18}
# tensorstore's error for a write that found no room (a ValueError, not an OSError).
TENSORSTORE_FULL = (
  'RESOURCE_EXHAUSTED: Error writing "step/.zarray" in OCDBT database: Failed to write 171 '
  "bytes to file 14: No space left on device [os_error_code='28']"
)


def state(step: int) -> TrainState:
  return TrainState(
    step=jnp.int32(step),
    params={'conv': {'kernel': jnp.ones((64, 64)) * step}},
    batch_stats={'bn': {'mean': jnp.zeros(64)}},
    opt_state=(optax.EmptyState(), {'momentum': {'conv': {'kernel': jnp.zeros((64, 64))}}}),
  )


def test_disk_full_is_recognised_in_every_form_it_comes():
  chained = RuntimeError('Failed to run 5 Handler Commit operations')
  chained.__cause__ = OSError(errno.ENOSPC, 'No space left on device')
  for error in (OSError(errno.ENOSPC, 'x'), OSError(errno.EDQUOT, 'x'), chained):
    assert storage.disk_full(error)
  assert storage.disk_full(ValueError(TENSORSTORE_FULL))
  assert not storage.disk_full(OSError(errno.EACCES, 'Permission denied'))
  assert not storage.disk_full(ValueError('DATA_LOSS: a truncated file'))
  assert not storage.disk_full(None)


def test_space_needed_counts_every_copy_the_run_keeps_and_what_is_written(tmp_path):
  mib = 2**20
  need, how = storage.space_needed(str(tmp_path), 10 * mib, 4 * mib, keep=3, events_bytes=mib)
  assert need == 4 * 10 * mib + 2 * 4 * mib + mib  # keep + 1 states, two best/, events.
  assert how.startswith('4 x 10.0 MiB of checkpoints (it keeps 3 and writes each new one')
  for name in ('checkpoints/1', 'checkpoints/2', 'best/2', 'checkpoints/3.damaged'):
    (tmp_path / name).mkdir(parents=True)
  need, _ = storage.space_needed(str(tmp_path), 10 * mib, 4 * mib, keep=3)
  assert need == 2 * 10 * mib + 4 * mib  # Two states and one best/ are already on disk.


def test_a_save_that_finds_the_disk_full_is_one_message_and_leaves_nothing_half_written(
  tmp_path, monkeypatch
):
  ckpts = checkpointing.Checkpoints(str(tmp_path), keep=2, async_save=False)
  ckpts.save(state(1), MODEL_CONFIG)
  partial = tmp_path / 'checkpoints' / f'2{checkpointing.TMP_MARKER}-1796400000'
  partial.mkdir()  # What the failed save left.

  def no_room(*args, **kwargs):
    raise ValueError(TENSORSTORE_FULL)

  monkeypatch.setattr(ckpts.latest, 'save', no_room)
  with pytest.raises(storage.DiskFullError) as info:
    ckpts.save(state(2), MODEL_CONFIG)
  message = str(info.value)
  assert message.startswith(
    f'The disk of --workdir {tmp_path} is full: a checkpoint could not be written '
    '(checkpoints/2: half-written, never read). '
  )
  assert 'MiB free now; the run needs' in message and 'of checkpoints (it keeps 2' in message
  assert message.endswith(
    'The newest complete checkpoint, step 1, is intact: free some space (or lower '
    '--config.keep_checkpoints) and rerun the same command to resume from it.'
  )
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1']
  ckpts.close()  # Reported once: closing does not raise it again.


def test_the_libraries_logs_of_a_full_disk_are_dropped_and_nothing_else(monkeypatch):
  monkeypatch.setattr(logging.getLogger('absl'), 'filters', [])
  monkeypatch.setattr(logging.getLogger('asyncio'), 'filters', [])
  storage.quiet_disk_full_logs()
  storage.quiet_disk_full_logs()  # Installed once.
  (absl_filter,) = logging.getLogger('absl').filters
  assert logging.getLogger('asyncio').filters == [absl_filter]

  def record(error):
    return logging.LogRecord('absl', logging.ERROR, '', 0, 'save failed', (), (None, error, None))

  assert not absl_filter(record(ValueError(TENSORSTORE_FULL)))
  assert absl_filter(record(ValueError('another failure')))
  assert absl_filter(logging.LogRecord('absl', logging.ERROR, '', 0, 'no error', (), None))
