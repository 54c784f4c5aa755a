"""Tests of psp_jax.train.optim: poly schedule, 10x head rate, coupled decay, torch SGD momentum."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from psp_jax.train import optim

BASE, STEPS, WD, M = 0.01, 50, 1e-4, 0.9


def optim_config(**overrides) -> ml_collections.ConfigDict:
  values = dict(base_lr=BASE, momentum=M, weight_decay=WD, power=0.9, head_lr_mult=10.0)
  values.update(warmup_steps=0, min_lr=0.0)
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def params_tree():
  rng = np.random.default_rng(0)
  leaf = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
    'backbone': {'layer0': {'conv1': {'kernel': leaf(3, 3, 3, 4)}, 'bn1': {'scale': leaf(4)}}},
    'ppm': {'0': {'conv': {'kernel': leaf(1, 1, 4, 2)}}},
    'cls': {'conv2': {'kernel': leaf(1, 1, 4, 5), 'bias': leaf(5)}},
    'aux': {'conv2': {'bias': leaf(5)}},
  }


def test_poly_schedule_at_first_middle_and_last_step():
  schedule = optim.poly_schedule(BASE, STEPS, 0.9)
  # util.poly_learning_rate: base * (1 - iter / max_iter) ** power; iteration i runs at poly(i).
  for step in (0, 17, STEPS - 1):
    expected = BASE * (1 - step / STEPS) ** 0.9
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6)
  assert float(schedule(0)) == pytest.approx(BASE)
  assert float(schedule(STEPS)) == 0.0


def test_min_lr_is_mmcv_poly_with_min_lr():
  # mmcv PolyLrUpdaterHook: (base - min_lr) * (1 - iter / max_iters) ** power + min_lr.
  schedule = optim.poly_schedule(BASE, STEPS, 0.9, min_lr=1e-4)
  for step in (0, 17, STEPS - 1, STEPS):
    expected = (BASE - 1e-4) * (1 - step / STEPS) ** 0.9 + 1e-4
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6)
  _, from_config = optim.create_optimizer(optim_config(min_lr=1e-4), STEPS)
  assert float(from_config(STEPS)) == pytest.approx(1e-4)


def test_warmup_multiplies_the_poly_rate():
  schedule = optim.poly_schedule(BASE, STEPS, 0.9, warmup_steps=4)
  for step in range(6):
    expected = BASE * (1 - step / STEPS) ** 0.9 * min(1.0, (step + 1) / 4)
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6)


def test_head_modules_get_ten_times_the_rate():
  labels = optim.param_labels(params_tree())
  assert labels['backbone']['layer0']['conv1']['kernel'] == 'backbone'
  assert labels['ppm']['0']['conv']['kernel'] == 'head'
  assert labels['cls']['conv2']['bias'] == 'head' and labels['aux']['conv2']['bias'] == 'head'
  tx, _ = optim.create_optimizer(optim_config(momentum=0.0, weight_decay=0.0), STEPS)
  params = params_tree()
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  for step in range(8):  # The update at step k is -lr(k) * g (no momentum, no decay).
    updates, state = tx.update(grads, state, params)
    lr = BASE * (1 - step / STEPS) ** 0.9
    np.testing.assert_allclose(updates['backbone']['layer0']['bn1']['scale'], -lr, rtol=1e-6)
    np.testing.assert_allclose(updates['cls']['conv2']['bias'], -10 * lr, rtol=1e-6)
    np.testing.assert_allclose(updates['ppm']['0']['conv']['kernel'], -10 * lr, rtol=1e-6)


def test_weight_decay_is_coupled_on_every_parameter():
  tx, _ = optim.create_optimizer(optim_config(momentum=0.0), STEPS)
  params = params_tree()
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # torch: d_p = grad + wd * p, then p -= lr * d_p: BatchNorm scales and biases included.
  np.testing.assert_allclose(
    updates['backbone']['layer0']['bn1']['scale'],
    -BASE * WD * params['backbone']['layer0']['bn1']['scale'],
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    updates['aux']['conv2']['bias'], -10 * BASE * WD * params['aux']['conv2']['bias'], rtol=1e-6
  )


def torch_style_reference(params, grads_seq, head_keys=('cls',)):
  """The torch.optim.SGD recurrence written out: buf = m buf + (g + wd p); p -= lr_t buf."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in p.items()}
  for step, grads in enumerate(grads_seq):
    lr = BASE * (1 - step / STEPS) ** 0.9
    for k in p:
      d = grads[k] + WD * p[k]
      buf[k] = M * buf[k] + d
      p[k] = p[k] - (10 * lr if k in head_keys else lr) * buf[k]
  return p


def test_momentum_accumulates_raw_gradients_with_changing_lr():
  rng = np.random.default_rng(1)
  params = {'backbone': rng.normal(size=5), 'cls': rng.normal(size=3)}
  grads_seq = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(6)]
  tx, _ = optim.create_optimizer(optim_config(), STEPS)
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(p)
  for grads in grads_seq:
    updates, state = tx.update(jax.tree.map(jnp.float32, grads), state, p)
    p = optax.apply_updates(p, updates)
  expected = torch_style_reference(params, grads_seq)
  for k in params:
    np.testing.assert_allclose(p[k], expected[k], rtol=1e-6, atol=1e-7)


@pytest.mark.torch
def test_matches_torch_sgd_with_poly_groups():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(2)
  params = {'backbone': rng.normal(size=(4, 3)), 'cls': rng.normal(size=(3,))}
  grads_seq = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(7)]
  t_params = {
    k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()
  }
  # tool/train.py: two parameter groups, the new modules at 10x; lr set after each step.
  sgd = torch.optim.SGD(
    [dict(params=[t_params['backbone']], lr=BASE), dict(params=[t_params['cls']], lr=BASE * 10)],
    lr=BASE,
    momentum=M,
    weight_decay=WD,
  )
  for i, grads in enumerate(grads_seq):
    for k, t in t_params.items():
      t.grad = torch.tensor(grads[k], dtype=torch.float64)
    sgd.step()
    lr = BASE * (1 - (i + 1) / STEPS) ** 0.9  # poly_learning_rate(base, current_iter=i + 1)
    sgd.param_groups[0]['lr'], sgd.param_groups[1]['lr'] = lr, lr * 10
  tx, _ = optim.create_optimizer(optim_config(), STEPS)
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(p)
  for grads in grads_seq:
    updates, state = tx.update(jax.tree.map(jnp.float32, grads), state, p)
    p = optax.apply_updates(p, updates)
  for k, t in t_params.items():
    np.testing.assert_allclose(np.asarray(p[k]), t.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_sgd_torch_is_optax_sgd_plus_coupled_decay():
  params = params_tree()
  grads = jax.tree.map(lambda x: 0.5 * x + 1.0, params)
  ours = optim.sgd_torch(0.1, 0.9, 0.0)
  ref = optax.sgd(0.1, momentum=0.9)
  s1, s2 = ours.init(params), ref.init(params)
  for _ in range(3):
    u1, s1 = ours.update(grads, s1, params)
    u2, s2 = ref.update(grads, s2, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)
