"""End-to-end runs of train.py on the synthetic data: workdir contents, stopping and resuming,
and what goes wrong: signals, a kill mid-save, a NaN loss, bad files, an unusable workdir.

Each run is a fresh `python train.py` as a user would start it (one CPU device, no
XLA_FLAGS), sharing one persistent compilation cache so only the first run compiles. Faults
that need a hook (a NaN, a save that hangs) go through tests/faults.py, which patches them
in and then runs train.py itself.
"""

import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from psp_jax.train import checkpointing

import datagen
from helpers import (
  assert_same_state,
  check,
  command,
  restored,
  snapshot,
  steps,
  train,
  user_env,
)

# One worker: one data set, one XLA cache.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group('train_py')]


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
  """A data dir (the small synthetic set is prepared once) and a compilation cache."""
  root = tmp_path_factory.mktemp('train_run')
  return dict(data_dir=str(root / 'tfds'), cache=str(root / 'xla_cache'))


def event_tags(workdir) -> set[str]:
  files = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  assert files, f'no TensorBoard events in {workdir}'
  tags = set()
  for name in files:
    acc = event_accumulator.EventAccumulator(str(workdir / name), size_guidance={})
    acc.Reload()
    for kind in ('scalars', 'tensors', 'images'):
      tags.update(acc.Tags().get(kind, []))
  return tags


@pytest.fixture(scope='module')
def straight_run(shared, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  return workdir, check(train(shared, workdir))


def test_train_py_writes_config_checkpoints_and_summaries(straight_run):
  workdir, log = straight_run
  # train.py chose the faster CPU convolution path itself, and XLA accepted the flag.
  assert 'xla_cpu_experimental_ynn_fusion_type=-individual_convolution' in log
  assert 'val mIoU' in log and 'img/s' in log
  config = json.loads((workdir / 'config.json').read_text())
  assert config['model']['width'] == 4 and config['num_train_steps'] == 6
  model_config = json.loads((workdir / 'model_config.json').read_text())
  assert model_config['num_classes'] == 11 and model_config['dtype'] == 'float32'
  assert model_config['width'] == 4 and model_config['bins'] == [1, 2, 3, 6]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']
  (best,) = os.listdir(workdir / 'best')
  for step_dir in (workdir / 'checkpoints' / '6', workdir / 'best' / best):
    assert {'state', 'model_config'} <= set(os.listdir(step_dir))
  assert restored(workdir / 'best' / best).keys() == restored(workdir / 'checkpoints' / '6').keys()
  tags = event_tags(workdir)
  expected = {'train/loss', 'train/main_loss', 'train/aux_loss', 'train/lr', 'val/mIoU'}
  expected |= {'val/mAcc', 'val/allAcc', 'train/images_per_sec', 'val/input_truth_prediction'}
  assert expected <= tags, sorted(tags)


def test_stopping_and_resuming_gives_the_same_run(shared, straight_run, tmp_path):
  straight, _ = straight_run
  workdir = tmp_path / 'resumed'
  check(train(shared, workdir, '--stop_at_step=3'))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3']
  log = check(train(shared, workdir))
  assert 'Resumed' in log
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']
  # Same step, schedule, momentum buffers and data position: the resumed run is the
  # straight run.
  keys = ('step', 'params', 'batch_stats', 'opt_state')
  got = restored(workdir / 'checkpoints' / '6', keys)
  expected = restored(straight / 'checkpoints' / '6', keys)
  assert got.keys() == expected.keys() and any('/opt_state/' in k for k in got)
  assert got['/step'] == 6
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=key)
  three = restored(workdir / 'checkpoints' / '3', keys)
  assert three['/step'] == 3 and any(not np.array_equal(three[k], got[k]) for k in got)
  # A workdir of another model is refused, not silently resumed.
  # A workdir of another model is refused before anything compiles, and left as it was.
  before = snapshot(workdir)
  proc = train(shared, workdir, model__depth=34)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 1 and 'another model (depth: checkpoint 18, config 34)' in log
  assert 'First step' not in log and 'Traceback' not in log
  assert snapshot(workdir) == before


# --- When things go wrong. ---------------------------------------------------------------------


def start(shared, workdir, *extra: str, env=None, **overrides):
  """Starts command(...) in the background, output to workdir's sibling log file."""
  log = workdir.parent / f'{workdir.name}.log'
  with open(log, 'w') as out:
    proc = subprocess.Popen(
      command(shared, workdir, *extra, **overrides),
      env=env or user_env(),
      cwd=str(workdir.parent),
      stdout=out,
      stderr=subprocess.STDOUT,
      text=True,
    )
  return proc, log


def wait_for(proc, ready, what: str, timeout: float = 600) -> None:
  """Polls ready() until True; fails if the process ends first or time runs out."""
  deadline = time.monotonic() + timeout
  while not ready():
    assert proc.poll() is None, f'the run ended (status {proc.returncode}) before {what}'
    assert time.monotonic() < deadline, f'no {what} after {timeout} s'
    time.sleep(0.05)


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_a_signal_saves_the_current_step_and_the_rerun_continues(
  shared, straight_run, tmp_path, sig
):
  workdir = tmp_path / 'run'
  proc, log = start(shared, workdir)
  # The signal arrives during start-up or compilation: the run stops after its first step.
  wait_for(proc, lambda: 'SIGTERM or Ctrl-C saves' in log.read_text(), 'stop handler')
  proc.send_signal(sig)
  assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
  text = log.read_text()
  match = re.search(rf'Preempted at step (\d+) \({sig.name}\): checkpoint saved', text)
  assert match, text[-4000:]
  step = int(match.group(1))
  assert 1 <= step < 6 and steps(workdir)[-1] == str(step)
  assert restored(workdir / 'checkpoints' / str(step), ('step',))['/step'] == step
  if sig == signal.SIGTERM:  # Once is enough for the rest: resuming gives the same run.
    resumed = check(train(shared, workdir))
    assert f'at step {step}.' in resumed
    assert_same_state(workdir / 'checkpoints' / '6', straight_run[0] / 'checkpoints' / '6')


def test_ctrl_c_twice_quits_at_once_without_a_traceback(shared, tmp_path):
  proc, log = start(shared, tmp_path / 'run')
  wait_for(proc, lambda: 'SIGTERM or Ctrl-C saves' in log.read_text(), 'stop handler')
  proc.send_signal(signal.SIGINT)
  time.sleep(0.5)
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=600) == 130, log.read_text()[-4000:]
  text = log.read_text()
  assert 'Traceback' not in text, text[-4000:]
  assert 'Interrupted: second SIGINT: stopping without a checkpoint.' in text


def test_kill_9_during_a_save_keeps_the_previous_checkpoint(shared, straight_run, tmp_path):
  workdir, marker = tmp_path / 'run', tmp_path / 'saving'
  env = user_env(FAULT_HANG_SAVE_AT_STEP='6', FAULT_MARKER=str(marker))
  proc, log = start(shared, workdir, env=env, script='faults.py')
  wait_for(proc, marker.exists, 'save of step 6')
  proc.kill()  # SIGKILL: no handler, no cleanup, mid-save.
  proc.wait(timeout=60)
  names = os.listdir(workdir / 'checkpoints')
  assert '3' in names and '6' not in names, names
  assert any(n.startswith('6.orbax-checkpoint-tmp') for n in names), names

  checkpoints = checkpointing.Checkpoints(str(workdir), keep=2)
  assert checkpoints.latest_step() == 3
  checkpoints.close()
  log = check(train(shared, workdir))
  assert 'Ignoring 1 unfinished checkpoint(s)' in log and 'at step 3.' in log
  assert steps(workdir) == ['3', '6']  # The half-written one was replaced.
  assert_same_state(workdir / 'checkpoints' / '6', straight_run[0] / 'checkpoints' / '6')


def test_a_nan_loss_stops_naming_the_step_or_is_skipped(shared, tmp_path):
  workdir = tmp_path / 'stop'
  proc = train(shared, workdir, env=user_env(FAULT_NAN_AT_STEP='5'), script='faults.py')
  log = proc.stdout + proc.stderr
  assert proc.returncode == 1, log[-4000:]
  assert re.search(r'Non-finite loss at step 5: loss=nan main_loss=nan aux_loss=nan', log), log
  assert 'the newest one (step 3) is kept' in log and 'Traceback' not in log
  assert steps(workdir) == ['3']
  workdir = tmp_path / 'skip'
  env = user_env(FAULT_NAN_AT_STEP='5')
  log = check(train(shared, workdir, env=env, script='faults.py', optim__skip_nonfinite_steps=True))
  assert 'Skipped step 5: non-finite loss (loss=nan' in log
  assert '1 step(s) with a non-finite loss were skipped' in log
  assert steps(workdir) == ['3', '6']
  final = restored(workdir / 'checkpoints' / '6', ('params', 'batch_stats', 'opt_state'))
  assert all(np.isfinite(v).all() for v in final.values())
  assert scalar_series(workdir, 'train/skipped_steps') == [0, 0, 0, 0, 1, 1]


def scalar_series(workdir, tag: str) -> list[float]:
  """The values of a TensorBoard scalar, by step (float32 as written)."""
  (name,) = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  acc = event_accumulator.EventAccumulator(str(workdir / name), size_guidance={'tensors': 0})
  acc.Reload()
  events = sorted(acc.Tensors(tag), key=lambda e: e.step)
  return [tensor_util.make_ndarray(e.tensor_proto).item() for e in events]


def test_same_seed_and_config_give_the_same_losses_bit_for_bit(shared, straight_run, tmp_path):
  workdir = tmp_path / 'again'
  check(train(shared, workdir))
  for tag in ('train/loss', 'train/main_loss', 'train/aux_loss'):
    first, second = scalar_series(straight_run[0], tag), scalar_series(workdir, tag)
    assert len(first) == 6 and np.array_equal(np.float32(first), np.float32(second)), tag
  assert_same_state(workdir / 'checkpoints' / '6', straight_run[0] / 'checkpoints' / '6')


def test_bad_data_file_is_named_or_skipped_and_counted(shared, tmp_path):
  datagen.write_list(tmp_path / 'data', 'train', 8, num_classes=11)
  datagen.write_list(tmp_path / 'data', 'val', 2, num_classes=11, seed=1)
  bad = tmp_path / 'data' / 'data' / 'img' / 'train_003.jpg'
  bad.write_bytes(bad.read_bytes()[:300])  # Truncated, as an interrupted copy leaves it.
  data = dict(
    data__name='list',
    data__root=str(tmp_path / 'data'),
    data__train_list='list/train.txt',
    data__val_list='list/val.txt',
  )
  # Two steps read all 8 files of the first epoch (4 images a step).
  proc = train(shared, tmp_path / 'fail', '--stop_at_step=2', **data)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 1, log[-4000:]
  assert f'error: {bad}: cannot read the image' in log, log[-4000:]
  assert 'skip_bad_examples' in log and 'Traceback' not in log
  log = check(
    train(shared, tmp_path / 'skip', '--stop_at_step=2', data__skip_bad_examples=True, **data)
  )
  assert f'Skipped bad example 1 of list train: {bad}: cannot read the image' in log


def test_unwritable_workdir_fails_at_once_with_a_message(shared, tmp_path):
  (tmp_path / 'file').write_text('not a directory')
  proc = train(shared, tmp_path / 'file' / 'run', cwd=tmp_path)
  log = proc.stdout + proc.stderr
  assert proc.returncode == 1 and 'Traceback' not in log
  assert f'error: Cannot write to --workdir {tmp_path / "file" / "run"}' in log, log
  assert (tmp_path / 'file').read_text() == 'not a directory'
