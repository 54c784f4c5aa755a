"""End-to-end runs of train.py on the synthetic data: workdir contents, stopping and resuming.

Each run is a fresh `python train.py` as a user would start it (one CPU device, no
XLA_FLAGS), sharing one persistent compilation cache so only the first run compiles.
"""

import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import ROOT  # noqa: I001 (tests/ is on sys.path)

SHRINK = dict(depth=18, width=4, head_channels=8, aux_channels=8, dtype='float32')


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
  """A data dir (the small synthetic set is prepared once) and a compilation cache."""
  root = tmp_path_factory.mktemp('train_run')
  return dict(data_dir=str(root / 'tfds'), cache=str(root / 'xla_cache'))


def train(shared, workdir, *extra: str, width: int = 4) -> subprocess.CompletedProcess:
  """Runs train.py on configs/synthetic.py shrunk to a tiny model, 6 steps of 4 images."""
  overrides = {f'model.{k}': v for k, v in dict(SHRINK, width=width).items()}
  overrides.update(
    {
      'data.data_dir': shared['data_dir'],
      'data.synthetic.num_train': 32,
      'data.synthetic.num_val': 8,
      'data.crop_size': 41,
      'data.deterministic': True,
      'data.shuffle_buffer': 32,
      'batch_size': 4,
      'num_train_steps': 6,
      'log_every_steps': 1,
      'eval_every_steps': 3,
      'checkpoint_every_steps': 3,
      'eval.batch_size': 8,
    }
  )
  command = [sys.executable, str(ROOT / 'train.py'), f'--config={ROOT / "configs/synthetic.py"}']
  command += [f'--workdir={workdir}', f'--compilation_cache_dir={shared["cache"]}', *extra]
  command += [f'--config.{k}={v}' for k, v in overrides.items()]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # As a user runs it.
  return subprocess.run(
    command, env=env, cwd=str(workdir.parent), capture_output=True, text=True, timeout=1200
  )


def check(proc: subprocess.CompletedProcess) -> str:
  log = proc.stdout + proc.stderr
  assert proc.returncode == 0, log[-4000:]
  return log


def event_tags(workdir) -> set[str]:
  from tensorboard.backend.event_processing import event_accumulator

  files = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  assert files, f'no TensorBoard events in {workdir}'
  tags = set()
  for name in files:
    acc = event_accumulator.EventAccumulator(str(workdir / name), size_guidance={})
    acc.Reload()
    for kind in ('scalars', 'tensors', 'images'):
      tags.update(acc.Tags().get(kind, []))
  return tags


def restored(step_dir, keys=('params', 'batch_stats')) -> dict[str, np.ndarray]:
  """{path: array} of parts of a checkpoint's state, read without a target."""
  state = ocp.StandardCheckpointer().restore(step_dir / 'state')
  flat = {}

  def walk(tree, prefix):
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for key, value in items:
      if isinstance(value, dict | list | tuple):
        walk(value, f'{prefix}/{key}')
      elif value is not None:
        flat[f'{prefix}/{key}'] = np.asarray(value)

  walk({k: state[k] for k in keys}, '')
  return flat


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
  proc = train(shared, workdir, width=8)
  assert proc.returncode != 0 and 'another model' in proc.stdout + proc.stderr
