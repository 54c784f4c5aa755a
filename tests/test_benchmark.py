"""benchmarks/vs_pytorch.py: the analytic FLOP count, and its --quick mode end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

from flops import function_flops  # noqa: E402


def conv(x, w, stride=1):
  return jax.lax.conv_general_dilated(
    x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def test_conv_and_dot_flops():
  x = jnp.zeros((2, 10, 12, 3))
  w = jnp.zeros((3, 3, 3, 5))
  forward = 2 * 2 * 10 * 12 * 5 * 9 * 3
  assert function_flops(conv, x, w)['conv'] == forward
  m = jnp.zeros((4, 6))
  assert function_flops(lambda a, b: a @ b, m, m.T)['dot'] == 2 * 4 * 4 * 6


def test_gradient_flops_are_three_forwards_and_count_useful_work():
  x = jnp.zeros((2, 10, 12, 3))
  w = jnp.zeros((3, 3, 3, 5))

  def loss(x, w, stride):
    return jnp.sum(conv(x, w, stride))

  for stride in (1, 2):
    forward = function_flops(lambda x, w, s=stride: conv(x, w, s), x, w)['conv']
    # Forward, input gradient and weight gradient: the same multiply-adds each. For the
    # strided conv the input gradient is a transposed conv whose inserted zeros do not count.
    both = function_flops(jax.grad(lambda x, w, s=stride: loss(x, w, s), (0, 1)), x, w)
    assert both['conv'] == pytest.approx(3 * forward, rel=0.15 if stride == 2 else 0)
    weight_only = function_flops(jax.grad(lambda w, s=stride: loss(x, w, s)), w)
    assert weight_only['conv'] == pytest.approx(2 * forward)


def test_scan_counts_every_iteration():
  w = jnp.zeros((8, 8))

  def body(h, _):
    return h @ w, None

  flops = function_flops(lambda h: jax.lax.scan(body, h, None, length=5)[0], jnp.zeros((2, 8)))
  assert flops['dot'] == 5 * 2 * 2 * 8 * 8


@pytest.mark.torch
@pytest.mark.e2e
def test_quick_mode_writes_table_json_and_chart(tmp_path):
  pytest.importorskip('torch')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # as a user runs it
  script = os.path.join(ROOT, 'benchmarks', 'vs_pytorch.py')
  cmd = [sys.executable, script, '--quick', '--reps', '1', '--out_dir', str(tmp_path)]
  done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads((tmp_path / 'vs_pytorch.json').read_text())
  rows = {r['case']: r for r in report['rows']}
  assert set(rows) == {'eval b1 473', 'train b2 473'}
  for row in rows.values():
    for side in ('jax', 'torch'):
      assert row[side]['median_s'] > 0 and len(row[side]['rep_seconds']) == 1
      assert row[side]['rss_peak_bytes'] > 0
    assert row['ratio'] == pytest.approx(row['jax']['median_s'] / row['torch']['median_s'])
    assert row['jax']['compile_s'] > 0
    analytic, xla = row['jax']['flops_analytic'], row['jax']['flops_xla']
    assert analytic > 0 and (xla is None or 0.3 < xla / analytic < 3)
  # Same weights and inputs: the two frameworks agree (float32 rounding only).
  assert rows['eval b1 473']['rel_err'] < 1e-4
  assert rows['train b2 473']['rel_err'] < 1e-3
  assert rows['train b2 473']['loss_rel_err'] < 1e-5
  # The training FLOPs are those of forward (with aux) plus backward: about 3x the forward's.
  per_image = {k: r['jax']['flops_analytic'] / r['batch'] for k, r in rows.items()}
  assert 2.5 < per_image['train b2 473'] / per_image['eval b1 473'] < 4.0
  table = (tmp_path / 'vs_pytorch.md').read_text()
  assert table == done.stdout
  lines = [line for line in table.splitlines() if line.startswith('| ')]
  assert lines[0].startswith('| case | PyTorch s | JAX s | JAX / PyTorch')
  assert [line.split(' | ')[0] for line in lines[1:]] == ['| eval b1 57', '| train b2 57']
  assert (tmp_path / 'vs_pytorch.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
