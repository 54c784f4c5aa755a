"""Tests of inference.evaluation and psp_jax.evaluate: metrics against NumPy, reports, hosts."""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from psp_jax import weights
from psp_jax.data import classes
from psp_jax.inference import evaluation
from psp_jax.inference.planning import MEAN, STD
from psp_jax.inference.sliding_window import InferenceConfig, SlidingWindowInference
from psp_jax.models import PSPNet

from helpers import intersection_and_union, random_variables

K = 6  # Class 5 never occurs: absent from prediction and ground truth.
STEP = 40  # An image's red channel encodes the prediction the oracle will make.


def oracle(variables, x):
  """A 'model' whose argmax at each pixel is round(red / STEP): predictions chosen at will."""
  del variables
  red = x[..., 0] * STD[0] + MEAN[0]
  return -((red[..., None] - STEP * jnp.arange(K)) ** 2)


def random_examples(seed, count, present=5):
  """Images encoding random predictions, and random labels with ignored pixels.

  Height 40 = base_size, so scale 1.0 keeps the size and the predictions stay exact; the
  widths vary, some below the 24 px crop (mean padding), some not (several windows).
  """
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    h, w = 40, rng.integers(9, 41)
    pred = rng.integers(0, present, (h, w))
    if rng.random() < 0.5:
      pred[pred == 1] = 2  # Some images without class 1 in the prediction.
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = STEP * pred
    label = rng.integers(0, present, (h, w)).astype(np.uint8)
    label[rng.random((h, w)) < 0.2] = 255
    label[label == 3] = 4  # Class 3 predicted but never in the ground truth.
    out.append(dict(image=image, label=label, pred=pred))
  return out


@pytest.fixture(scope='module')
def oracle_inference():
  # Scale 1 with base_size 40 keeps images up to 40 px unresized: predictions stay exact.
  procedure = InferenceConfig(crop_size=(24, 24), base_size=40, tile_size=16, flip=True)
  return SlidingWindowInference(oracle, {}, num_classes=K, procedure=procedure)


def test_oracle_predictions_survive_the_pipeline(oracle_inference):
  examples = random_examples(1, 4)
  plans = [oracle_inference.plan(ex['image']) for ex in examples]
  labels, _ = oracle_inference.run(plans)
  for ex, got in zip(examples, labels, strict=True):
    np.testing.assert_array_equal(got, ex['pred'])


def confusion_of(inference, examples):
  return evaluation.evaluate_examples(inference, iter(examples), progress=False).confusion


@pytest.mark.parametrize('protocol', ['official', 'mmseg'])
def test_metrics_equal_numpy_reference(oracle_inference, protocol):
  examples = random_examples(2, 19)  # 19 = two full steps on 8 devices and a partial one.
  confusion = confusion_of(oracle_inference, examples)
  sums = [intersection_and_union(ex['pred'], ex['label'], K) for ex in examples]
  inter, union, target = (np.sum(s, axis=0) for s in zip(*sums, strict=True))
  np.testing.assert_array_equal(np.diag(confusion), inter)
  np.testing.assert_array_equal(confusion.sum(1), target)
  names = [f'c{i}' for i in range(K)]
  res = evaluation.summarize(confusion, names, protocol=protocol)
  iou, acc = inter / (union + 1e-10), inter / (target + 1e-10)
  if protocol == 'official':  # tool/test.py: mean over all classes, absent ones count 0.
    expected = dict(mIoU=np.mean(iou), mAcc=np.mean(acc))
  else:  # mmsegmentation: NaN (skipped) where union, resp. target, is 0.
    expected = dict(mIoU=np.mean(iou[union > 0]), mAcc=np.mean(acc[target > 0]))
  assert union[5] == 0 and target[3] == 0 and union[3] > 0
  np.testing.assert_allclose(res['mIoU'], expected['mIoU'], rtol=1e-6)
  np.testing.assert_allclose(res['mAcc'], expected['mAcc'], rtol=1e-6)
  np.testing.assert_allclose(res['allAcc'], inter.sum() / (target.sum() + 1e-10), rtol=1e-6)
  np.testing.assert_allclose([c['iou'] for c in res['per_class']][:3], iou[:3], rtol=1e-6)
  assert protocol in res['protocol_note']


def test_reports_name_classes_and_protocol(tmp_path):
  confusion = np.array([[5, 1, 0], [2, 7, 0], [0, 0, 0]])
  res = evaluation.summarize(
    confusion, ['wall', 'sky', 'tree'], protocol='official', setup=dict(mode='slide')
  )
  text, md = evaluation.format_text(res), evaluation.format_markdown(res)
  for report in (text, md):
    assert 'official' in report and 'all 3 classes' in report
    assert 'sky' in report and 'mode=slide' in report
  assert '| sky |  70.00 |  77.78 | 9 |' in md  # IoU 7 / (9 + 8 - 7), acc 7 / 9.
  evaluation.write_results(res, tmp_path)
  loaded = json.loads((tmp_path / 'results.json').read_text())
  assert loaded['per_class'][2] == dict(name='tree', iou=0.0, acc=0.0, pixels=0)
  assert (tmp_path / 'results.txt').read_text().startswith('protocol: official')


def test_large_counts_do_not_overflow(oracle_inference, monkeypatch):
  # Force a move to the host after every step: totals must not change.
  examples = random_examples(3, 10)
  expected = evaluation.evaluate_examples(
    oracle_inference, iter(examples), progress=False
  ).confusion
  monkeypatch.setattr(evaluation, '_INT32_MAX', 1)
  got = confusion_of(oracle_inference, examples)
  np.testing.assert_array_equal(got, expected)
  assert got.dtype == np.int64


_HOST_SCRIPT = """
import os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
import jax, numpy as np
jax.distributed.initialize('127.0.0.1:' + sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
sys.path.insert(0, sys.argv[3])
import test_evaluate as t
from psp_jax.inference import evaluation
from psp_jax.inference.sliding_window import InferenceConfig, SlidingWindowInference
inference = SlidingWindowInference(
  t.oracle, {}, num_classes=t.K, procedure=InferenceConfig(crop_size=(24, 24), base_size=40))
pid = jax.process_index()
examples = t.random_examples(10 + pid, 3 if pid == 0 else 7)  # Unequal numbers of steps.
local = evaluation.evaluate_examples(inference, iter(examples), progress=False).confusion
total = evaluation.sum_over_hosts(local)
np.save(sys.argv[4] + f'/{pid}.npy', np.stack([local, total]))
"""


@pytest.mark.multiprocess
@pytest.mark.e2e
def test_two_hosts_sum_their_confusions(tmp_path):
  port = str(20000 + os.getpid() % 20000)
  script = tmp_path / 'host.py'
  script.write_text(_HOST_SCRIPT)
  here = str(pathlib.Path(__file__).parent)
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(i), port, here, str(tmp_path)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  for p in procs:
    out = p.communicate(timeout=300)[0].decode()
    assert p.returncode == 0, out[-3000:]
  (local0, total0), (local1, total1) = (np.load(tmp_path / f'{i}.npy') for i in range(2))
  np.testing.assert_array_equal(total0, local0 + local1)
  np.testing.assert_array_equal(total1, total0)
  assert local0.sum() > 0 and local1.sum() > local0.sum()


@pytest.mark.e2e
def test_command_line_on_synthetic_data(tmp_path):
  """python -m psp_jax.evaluate on a converted checkpoint and the generated data set."""

  model_config = dict(num_classes=11, depth=18, width=8, head_channels=16, aux_channels=8)
  variables = random_variables(PSPNet(**model_config), seed=2)
  weights.save_variables(tmp_path / 'ckpt', variables, model_config)
  root = pathlib.Path(__file__).parent.parent
  overrides = dict(
    data_dir=tmp_path / 'data',
    synthetic_image_size=40,
    synthetic_num_train=1,
    synthetic_num_val=5,
    crop_size=33,
  )
  args = [
    f'--config.data.{k.replace("synthetic_", "synthetic.")}={v}' for k, v in overrides.items()
  ]
  args += [
    '--config.eval.scales=(0.75,1.25)',
    '--config.eval.mode=slide',
    '--config.eval.base_size=40',
    '--config.eval.protocol=mmseg',
    '--config.model.dtype=auto',  # float32 on CPU
  ]
  result = subprocess.run(
    [sys.executable, '-m', 'psp_jax.evaluate', f'--config={root}/configs/synthetic.py']
    + [f'--checkpoint={tmp_path / "ckpt"}', f'--output_dir={tmp_path / "out"}', *args],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'mIoU' in result.stdout and 'mmseg' in result.stdout
  res = json.loads((tmp_path / 'out' / 'results.json').read_text())
  assert res['setup']['images'] == 5 and res['setup']['scales'] == [0.75, 1.25]
  assert res['setup']['stride'] == [22, 22] and res['protocol'] == 'mmseg'
  assert res['setup']['dtype'] == 'float32'
  assert [c['name'] for c in res['per_class']] == list(classes.CLASS_NAMES['synthetic'])
  assert sum(c['pixels'] for c in res['per_class']) > 0
  ious = [c['iou'] for c in res['per_class'] if c['iou'] is not None]
  np.testing.assert_allclose(res['mIoU'], np.mean(ious), rtol=1e-9)
  assert (tmp_path / 'out' / 'results.md').read_text().count('\n|') == 2 + 11  # Header rows.
