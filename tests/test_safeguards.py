"""Tests of psp_jax.train.safeguards and the workdir checks, in process (test_train_run.py
runs the real train.py through the same faults)."""

import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import multihost_utils

from psp_jax import distributed, experiment, paths
from psp_jax.data import sources
from psp_jax.train import checkpointing, loop, safeguards, storage, summaries
from psp_jax.train.train_state import TrainState

from helpers import tiny_config


def test_stop_request_sets_a_flag_and_restores_the_handlers():
  def mine(signum, frame):
    raise AssertionError('the previous handler must not run inside the block')

  previous = signal.signal(signal.SIGTERM, mine)
  try:
    with safeguards.StopRequest() as stop:
      assert not stop.requested and not stop.agreed(sync_point=False)
      os.kill(os.getpid(), signal.SIGTERM)  # Handled before the next bytecode.
      assert stop.requested and stop.signal_name == 'SIGTERM'
      assert stop.agreed(sync_point=False)  # One process: every step is a boundary.
  finally:
    restored = signal.signal(signal.SIGTERM, previous)
  assert restored is mine
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# A second SIGINT ends the process, even while Python runs a garbage-collection callback
# (where a KeyboardInterrupt would be printed as "Exception ignored" and swallowed).
SECOND_SIGINT = """
import gc, os, signal, time
from psp_jax.train import safeguards
with safeguards.StopRequest() as stop:
  os.kill(os.getpid(), signal.SIGTERM)
  gc.callbacks.append(lambda *args: os.kill(os.getpid(), signal.SIGINT))
  gc.collect()
  time.sleep(5)
print('still running')
"""


@pytest.mark.e2e
def test_a_second_sigint_ends_the_process_at_once():
  proc = subprocess.run(
    [sys.executable, '-c', SECOND_SIGINT], capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 130, (proc.returncode, proc.stdout, proc.stderr[-3000:])
  assert 'still running' not in proc.stdout
  assert 'Interrupted: second SIGINT: stopping without a checkpoint.' in proc.stderr
  assert 'Traceback' not in proc.stderr and 'Exception ignored' not in proc.stderr


def toy_step(state: TrainState, batch, rng):
  """A train step of one weight: loss = w * x, SGD with lr 1 (x may be NaN or inf)."""
  del rng
  grad = batch['x']
  params = {'w': state.params['w'] - grad}
  metrics = {'loss': state.params['w'] * batch['x'], 'grad_norm': jnp.abs(grad)}
  return state.replace(step=state.step + 1, params=params, opt_state=state.opt_state + 1), metrics


def toy_state() -> TrainState:
  return TrainState(
    step=jnp.int32(0), params={'w': jnp.float32(2.0)}, batch_stats={}, opt_state=jnp.int32(0)
  )


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_guard_keeps_the_state_of_a_non_finite_step_but_counts_the_step(bad):
  step = jax.jit(safeguards.guard_nonfinite(toy_step))
  state, metrics = step(toy_state(), {'x': jnp.float32(0.5)}, None)
  expected, _ = toy_step(toy_state(), {'x': jnp.float32(0.5)}, None)
  assert float(state.params['w']) == float(expected.params['w']) == 1.5
  assert float(metrics['nonfinite']) == 0.0
  state, metrics = step(state, {'x': jnp.float32(bad)}, None)
  assert float(metrics['nonfinite']) == 1.0
  assert float(state.params['w']) == 1.5 and int(state.opt_state) == 1  # Unchanged...
  assert int(state.step) == 2  # ...but the batch was consumed.


def test_non_finite_steps_stop_naming_the_step_or_are_counted(caplog):
  good = {'loss': 1.0, 'main_loss': 0.8, 'aux_loss': 0.5, 'grad_norm': 3.0, 'nonfinite': 0.0}
  bad = dict(good, loss=np.nan, main_loss=np.nan, nonfinite=1.0)
  stop = safeguards.NonFiniteSteps(skip=False)
  for step, metrics in enumerate([good, good, bad, bad], 11):
    stop.add(step, {k: jnp.float32(v) for k, v in metrics.items()})
  message = 'Non-finite loss at step 13: loss=nan main_loss=nan aux_loss=0.5 grad_norm=3.*step 10'
  with pytest.raises(safeguards.NonFiniteLossError, match=message):
    stop.check(last_checkpoint=10)
  skip = safeguards.NonFiniteSteps(skip=True)
  for step, metrics in enumerate([good, bad, good, bad], 1):
    skip.add(step, {k: jnp.float32(v) for k, v in metrics.items()})
  assert skip.check(last_checkpoint=None) == [2, 4] and skip.skipped == 2
  assert skip.check(last_checkpoint=None) == []  # Each step is checked once.
  assert '2 step(s) skipped' in caplog.text
  means = safeguards.finite_mean([good, bad, dict(good, loss=3.0)])
  assert means['loss'] == 2.0 and 'nonfinite' not in means


def test_unwritable_workdir_is_refused_untouched(tmp_path):
  (tmp_path / 'file').write_text('keep')
  with pytest.raises(storage.WorkdirError, match='Cannot write to --workdir.*file/run'):
    storage.check_workdir(str(tmp_path / 'file' / 'run'))
  assert (tmp_path / 'file').read_text() == 'keep'
  storage.check_workdir(str(tmp_path / 'new' / 'run'))  # Created, and left empty.
  assert os.listdir(tmp_path / 'new' / 'run') == []


def test_full_workdir_fails_before_anything_compiles(tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('mine')
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage._replace(free=10_000))

  def no_jit(*args, **kwargs):
    raise AssertionError('jax.jit was called before the workdir was checked')

  monkeypatch.setattr(jax, 'jit', no_jit)
  # The data are not this test's subject (tiny_config's ADE20K is not prepared here).
  monkeypatch.setattr(sources, 'check_available', lambda data_config, splits: None)
  with pytest.raises(storage.WorkdirError, match=r'0\.0 MiB free.*checkpoint.*MiB'):
    experiment.train_and_evaluate(tiny_config(), str(workdir))
  assert sorted(os.listdir(workdir)) == ['best', 'checkpoints', 'notes.txt']
  assert (workdir / 'notes.txt').read_text() == 'mine'


def test_differences_name_the_model_settings():
  saved = dict(depth=50, num_classes=150, dtype='bfloat16', width=64)
  wanted = dict(depth=101, num_classes=21, dtype='float32', width=64)
  assert loop._differences(saved, wanted) == [
    'depth: checkpoint 50, config 101',
    'num_classes: checkpoint 150, config 21',
  ]
  assert loop._differences(saved, dict(saved, dtype='float32')) == []


def test_several_processes_stop_together_at_sync_points(monkeypatch):
  gathered = []

  def allgather(flag, tiled=False):  # This process saw no signal; another one did.
    gathered.append(int(flag))
    return np.array([int(flag), 1])

  met = []
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(distributed, 'meet', met.append)
  monkeypatch.setattr(multihost_utils, 'process_allgather', allgather)
  stop = safeguards.StopRequest()
  assert not stop.agreed(sync_point=False) and gathered == []  # No collective off sync points.
  assert stop.agreed(sync_point=True) and gathered == [0]
  assert met == ['stop request']  # The processes meet before the gather (distributed.meet).


def test_a_bucket_workdir_stays_remote(tmp_path, monkeypatch):
  """gs://bucket/run must reach orbax and the config writer as it is: os.path.abspath made
  it ./gs:/bucket/run, so a TPU VM wrote its checkpoints to a disk lost on preemption."""
  monkeypatch.chdir(tmp_path)
  assert str(paths.as_path('gs://bucket/run') / 'best') == 'gs://bucket/run/best'
  assert str(paths.as_path('run')) == str(tmp_path / 'run')
  directories = []

  class Recorder:
    def __init__(self, directory, **kwargs):
      self.directory = directory
      directories.append(str(directory))

  monkeypatch.setattr(checkpointing.ocp, 'CheckpointManager', Recorder)
  checkpointing.Checkpoints('gs://bucket/run', keep=1)
  assert directories == ['gs://bucket/run/checkpoints', 'gs://bucket/run/best']
  written = {}
  remote = type(paths.as_path('gs://bucket'))  # etils' GCS path (tf.io.gfile here)
  monkeypatch.setattr(remote, 'mkdir', lambda self, **kw: None)
  monkeypatch.setattr(remote, 'write_text', lambda self, text: written.setdefault(str(self), text))
  summaries.write_config('gs://bucket/run', tiny_config(), {'num_classes': 3})
  assert sorted(written) == ['gs://bucket/run/config.json', 'gs://bucket/run/model_config.json']
  assert not (tmp_path / 'gs:').exists()
