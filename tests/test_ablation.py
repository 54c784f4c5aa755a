"""configs/ablation.py and benchmarks/ablation.py: variant configs, the report, a --quick run."""

import importlib
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psp_jax import experiment
from psp_jax.inference import evaluation
from psp_jax.models import codec
from psp_jax.train import config_checks

from helpers import ROOT

for path in (ROOT, ROOT / 'benchmarks'):
  if str(path) not in sys.path:
    sys.path.insert(0, str(path))

ablation_config = importlib.import_module('configs.ablation')
ablation = importlib.import_module('ablation')
report = importlib.import_module('ablation_report')
receptive_field = importlib.import_module('receptive_field')

TABLE1 = ('baseline', 'b1-max', 'b1-avg', 'b1236-max', 'b1236-avg', 'b1236-max-dr', 'b1236-avg-dr')
NUMBER = re.compile(r'^-?\d+\.\d+( \(-?\d+\.\d+–-?\d+\.\d+\))?$')


def test_every_variant_is_a_valid_config_that_changes_only_its_row():
  default = ablation_config.get_config()
  assert default.model.to_dict() == ablation_config.get_config('b1236-avg-dr').model.to_dict()
  for name, (model, optim) in ablation_config.VARIANTS.items():
    config = ablation_config.get_config(name)
    config_checks.validate(config, device_count=1, process_count=1)
    assert config.num_train_steps == ablation_config.STEPS
    assert config.eval_every_steps == config.checkpoint_every_steps == config.num_train_steps
    # Every variant trains and is evaluated on the same scenes, crops and batch.
    assert config.data.synthetic.image_size == config.eval.base_size == ablation_config.IMAGE_SIZE
    assert (config.data.crop_size, config.batch_size) == (
      ablation_config.CROP_SIZE,
      ablation_config.BATCH_SIZE,
    )
    assert config.data.crop_size % 8 == 1 and config.data.crop_size < ablation_config.IMAGE_SIZE
    for key, value in config.model.items():
      assert value == model.get(key, default.model[key]), (name, key)
    assert config.optim.aux_weight == optim.get('aux_weight', 0.4), name
  assert set(TABLE1) | {'baseline-aux0'} == set(ablation_config.CORE_VARIANTS)
  with pytest.raises(ValueError, match='Unknown ablation variant'):
    ablation_config.get_config('b1236-median')


@pytest.mark.parametrize('name', TABLE1)
def test_variant_builds_the_pyramid_of_its_row(name):
  config = ablation.make_config(name, 0, 2, quick=True, data_dir=None)
  model = codec.build_model(codec.of_experiment(config, 'cpu'))
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((2, 41, 41, 3)), train=False)
  )
  params = shapes['params']
  if name == 'baseline':
    assert 'ppm' not in params
    return
  bins = config.model.bins
  assert sorted(params['ppm']) == [str(k) for k in range(len(bins))]
  layer4 = 8 * config.model.width
  kernel = params['ppm']['0']['conv']['kernel'].shape
  assert kernel == (1, 1, layer4, layer4 // len(bins) if name.endswith('-dr') else layer4)
  assert config.model.pool == ('max' if '-max' in name else 'avg')


def fake(variant, seed, miou, context=0.5):
  iou = {name: 0.9 for name in ('sky', 'building', 'tree', 'road', 'water', 'grass', 'sand')}
  iou.update({c: context for c in report.CONTEXT_CLASSES})
  return dict(
    variant=variant, seed=seed, mIoU=miou, allAcc=miou + 0.05, iou=iou,
    setup=dict(images=200, mode='whole', flip=True), val_in_training=dict(mIoU=miou),
    train_seconds=60.0, eval_seconds=5.0,
    config=dict(batch_size=8, data=dict(crop_size=193, synthetic=dict(image_size=257))),
  )  # fmt: skip


def test_verdicts_use_every_seed():
  assert report.verdict([0.01, 0.02]) == 'reproduced (2 seeds)'
  assert report.verdict([0.01]) == 'same order (1 seed only)'
  assert report.verdict([-0.01, -0.02, -0.03]) == 'reversed (3 seeds)'
  assert report.verdict([0.03, -0.01]).startswith('same order on average, not in every seed')
  assert report.verdict([-0.03, 0.01]).startswith('not reproduced')


def test_report_tables_claims_and_chart(tmp_path):
  results = [
    fake('baseline', 0, 0.80, 0.40), fake('baseline', 1, 0.82, 0.44),
    fake('b1-avg', 0, 0.85, 0.70), fake('b1-avg', 1, 0.81, 0.60),
    fake('b1236-avg-dr', 0, 0.88, 0.80), fake('b1236-avg-dr', 1, 0.89, 0.82),
    fake('baseline-aux0', 0, 0.79), fake('baseline-aux0', 1, 0.84),
  ]  # fmt: skip
  env = dict(command='x', date='d', steps=5, seeds=[0, 1], jax='j', machine='m', total_seconds=520)
  (tmp_path / 'ablation.md').write_text('# Kept title\n\nKept text.\n\n' + report.RESULTS_MARKER)
  md_path, png_path = report.write(results, env, tmp_path)
  md = md_path.read_text()
  assert md.startswith('# Kept title\n\nKept text.\n') and md.count(report.RESULTS_MARKER) == 1
  assert '5 steps per run at batch 8, 257-pixel scenes, 193-pixel crops,' in md
  assert '| ResNet50+B1236+AVE+DR (`b1236-avg-dr`) | 41.68 | 80.04 | 88.50 (88.00–89.00) |' in md
  assert '| ResNet50 (without AL) (`baseline-aux0`) | 35.82 | 77.07 | 81.50 (79.00–84.00) |' in md
  claim = {line.split('` > `')[0].split('`')[-1] + '>' + line.split('` > `')[1].split('`')[0]: line
           for line in md.splitlines() if '` > `' in line}  # fmt: skip
  assert set(claim) == {'b1236-avg-dr>baseline', 'baseline>baseline-aux0'}
  assert claim['b1236-avg-dr>baseline'].endswith(
    '| +4.45 | +7.50 (+7.00 to +8.00) | +39.00 (+38.00 to +40.00) | reproduced (2 seeds) |'
  )
  # 0.80 vs 0.79 and 0.82 vs 0.84: the paper's order in one seed, reversed on average.
  assert claim['baseline>baseline-aux0'].endswith(
    '| +1.41 | -0.50 (-2.00 to +1.00) | -8.00 (-10.00 to -6.00) | not reproduced: reversed on '
    'average, not in every seed (2 seeds) |'
  )
  assert png_path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def table_rows(md: str) -> dict[str, list[str]]:
  """{variant: cells} of the rows of the paper-form tables (Table 1 and 2)."""
  rows = {}
  for line in md.splitlines():
    match = re.match(r'^\| [^|`]+ \(`([\w.-]+)`\) \|(.*)\|$', line)
    if match:
      rows.setdefault(match[1], [c.strip() for c in match[2].split('|')])
  return rows


@pytest.mark.e2e
def test_quick_run_end_to_end_then_rerun_skips(tmp_path, monkeypatch, capsys):
  workdir = tmp_path / 'runs'
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # One device, as a user.
  args = ['--quick', f'--workdir={workdir}', f'--compilation_cache_dir={tmp_path / "cache"}']
  proc = subprocess.run(
    [sys.executable, str(ROOT / 'benchmarks' / 'ablation.py'), *args],
    env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  assert proc.stdout.count('ETA') == 3  # After each of the first three of four runs.
  md = (workdir / 'ablation.md').read_text()
  rows = table_rows(md)
  assert set(rows) == set(ablation.QUICK['variants'])
  for cells in rows.values():
    assert len(cells) == 8 and all(NUMBER.match(c) for c in cells), cells
    assert '–' in cells[2]  # Two seeds: mean (min–max).
  assert 'the auxiliary loss (alpha 0.4) helps' in md
  assert (workdir / 'ablation.png').stat().st_size > 10_000
  result = workdir / 's3' / 'baseline' / 'seed1' / ablation.RESULT_FILE
  stored = json.loads(result.read_text())
  assert stored['setup']['images'] == ablation.QUICK['synthetic']['num_val']
  assert set(stored['iou']) >= set(report.CONTEXT_CLASSES)

  # The receptive-field script reads a run's config and weights and draws its gradient map.
  receptive_field.main(
    [str(result.parent), '--sizes=41', '--images=2', '--far=8', f'--out={tmp_path / "rf.png"}']
  )
  out = capsys.readouterr().out
  assert re.search(r'^\| 41 px \| [\d,]+ \| \d+ px \| \d+ px \| \d+% \|$', out, re.M), out
  assert re.search(r'^\| `baseline/seed1` \| 41 px \| \d+ px \| \d+ px \| [\d.]+% \|$', out, re.M)
  assert '| an even spread (reference) | 41 px |' in out
  assert (tmp_path / 'rf.png').read_bytes()[:4] == b'\x89PNG'

  # A rerun reads every result and trains nothing.

  def refuse(*args, **kwargs):
    raise AssertionError('a finished run was run again')

  monkeypatch.setattr(experiment, 'train_and_evaluate', refuse)
  monkeypatch.setattr(evaluation, 'evaluate', refuse)
  (workdir / 'ablation.md').unlink()
  ablation.main([*args[:2], '--compilation_cache_dir='])
  assert table_rows((workdir / 'ablation.md').read_text()) == rows

  # A stored result of another config is refused, not silently reused.
  stored['config']['optim']['base_lr'] = 1.0
  result.write_text(json.dumps(stored))
  with pytest.raises(RuntimeError, match='another config'):
    ablation.main([*args[:2], '--compilation_cache_dir='])


def test_receptive_field_radii_and_gradient_support():
  weights = np.zeros((21, 21))
  weights[10, 10], weights[10, 20] = 1.0, 3.0  # A quarter at the point, the rest 10 px away.
  assert receptive_field.radial_stats(weights, (10, 10), far=5) == dict(
    r50=10.0, r90=10.0, far=0.75
  )
  assert receptive_field.radial_stats(weights, (10, 20), far=5)['r50'] == 0.0

  # A 3x3 box filter: the winning logit at (4, 6) depends on its 3x3 window and nothing else.
  def apply_fn(variables, x):
    box = jax.lax.conv_general_dilated(
      x.sum(-1, keepdims=True),
      variables,
      (1, 1),
      'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )
    return jnp.concatenate([box, jnp.full_like(box, -1e3)], axis=-1)

  images = np.random.default_rng(0).integers(0, 256, (3, 9, 11, 3), dtype=np.uint8)
  grad = receptive_field.gradient_map(apply_fn, jnp.ones((3, 3, 1, 1)), images, (4, 6))
  support = np.zeros((9, 11), bool)
  support[3:6, 5:8] = True
  np.testing.assert_allclose(grad[support], 3.0)  # d/d(normalised input), summed over RGB.
  assert (grad[~support] == 0).all()
