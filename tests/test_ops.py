"""psp_jax.models.ops against PyTorch: adaptive pooling, bilinear resize, stem max-pool."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psp_jax.models import ops

# (H, W, output_size): divisible, non-divisible (overlapping, unequal windows), 1x1 input,
# output larger than the input, and PSPNet's feature sizes at 473 and 713 crops.
POOL_CASES = [
  (48, 64, 3),
  (48, 64, 6),
  (7, 5, 6),
  (1, 1, 6),
  (1, 1, 1),
  (2, 3, (5, 7)),
  (13, 17, (4, 3)),
  (60, 60, 6),
  (60, 60, 1),
  (90, 90, 3),
  (33, 45, 2),
  (5, 9, (5, 2)),
]
# (H, W, out_h, out_w): up-sampling, down-sampling, mixed, 1-pixel sides on either end.
RESIZE_CASES = [
  (5, 5, 33, 33),
  (6, 6, 60, 60),
  (60, 60, 473, 473),
  (7, 9, 30, 45),
  (33, 45, 7, 5),
  (48, 64, 13, 17),
  (7, 5, 1, 1),
  (1, 1, 4, 6),
  (2, 3, 3, 2),
  (9, 1, 4, 3),
  (12, 12, 12, 12),
]
# Observed max |diff| is 4.8e-7 (float32 rounding); the brief asks <= 1e-5, and 2e-6 still
# catches a sample moved by one float32 ulp of its source index (up to ~1e-5 here).
TOL = 2e-6


def _torch_nchw(torch, x: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _random(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.torch
# max: 13 s on 2 cores (a gradient through every window size), the slow tier's.
@pytest.mark.parametrize('kind', ['avg', pytest.param('max', marks=pytest.mark.slow)])
def test_adaptive_pool_equals_torch(kind):
  torch = pytest.importorskip('torch')
  ours = {'avg': ops.adaptive_avg_pool2d, 'max': ops.adaptive_max_pool2d}[kind]
  theirs = {'avg': torch.nn.functional.adaptive_avg_pool2d}
  theirs['max'] = torch.nn.functional.adaptive_max_pool2d
  for i, (h, w, size) in enumerate(POOL_CASES):
    x = _random((2, h, w, 3), seed=i)
    got = np.asarray(ours(jnp.asarray(x), size))
    want = _nhwc(theirs[kind](_torch_nchw(torch, x), size))
    assert got.shape == want.shape, (h, w, size)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=f'{kind} {h}x{w} -> {size}')
    if kind == 'avg':  # Width first, as the step of split images traces it: the same means.
      with ops.height_split():
        split = np.asarray(ours(jnp.asarray(x), size))
      np.testing.assert_allclose(split, want, rtol=0, atol=TOL, err_msg=f'split {h}x{w}')


@pytest.mark.torch
@pytest.mark.parametrize('align_corners', [True, False])
def test_resize_bilinear_equals_torch(align_corners):
  torch = pytest.importorskip('torch')
  for i, (h, w, oh, ow) in enumerate(RESIZE_CASES):
    x = _random((2, h, w, 3), seed=i)
    got = np.asarray(ops.resize_bilinear(jnp.asarray(x), (oh, ow), align_corners=align_corners))
    want = _nhwc(
      torch.nn.functional.interpolate(
        _torch_nchw(torch, x), (oh, ow), mode='bilinear', align_corners=align_corners
      )
    )
    assert got.shape == (2, oh, ow, 3)
    np.testing.assert_allclose(
      got, want, rtol=0, atol=TOL, err_msg=f'{h}x{w} -> {oh}x{ow} ac={align_corners}'
    )


@pytest.mark.torch
def test_gradients_equal_torch():
  """Backward of the PPM's pool and of the upsampling (scatter of the gathers) as torch."""
  torch = pytest.importorskip('torch')
  x = _random((2, 13, 17, 3))
  g_pool = _random((2, 6, 6, 3), seed=1)
  g_resize = _random((2, 30, 45, 3), seed=2)

  def loss(v):
    pooled = ops.adaptive_avg_pool2d(v, 6)
    resized = ops.resize_bilinear(v, (30, 45), align_corners=True)
    return jnp.sum(pooled * g_pool) + jnp.sum(resized * g_resize)

  got = np.asarray(jax.grad(loss)(jnp.asarray(x)))
  xt = _torch_nchw(torch, x).requires_grad_(True)
  pooled = torch.nn.functional.adaptive_avg_pool2d(xt, 6)
  resized = torch.nn.functional.interpolate(xt, (30, 45), mode='bilinear', align_corners=True)
  total = (pooled * _torch_nchw(torch, g_pool)).sum() + (
    resized * _torch_nchw(torch, g_resize)
  ).sum()
  total.backward()
  np.testing.assert_allclose(got, _nhwc(xt.grad), rtol=0, atol=1e-5)


@pytest.mark.torch
def test_stem_max_pool_equals_torch():
  """Odd and even sides; all-negative input shows the padding is -inf, never 0."""
  torch = pytest.importorskip('torch')
  pool = torch.nn.MaxPool2d(3, stride=2, padding=1)
  for h, w in [(17, 17), (16, 15), (1, 2), (237, 237)]:
    x = -np.abs(_random((2, h, w, 4))) - 1.0
    got = np.asarray(ops.max_pool_3x3_s2(jnp.asarray(x)))
    np.testing.assert_array_equal(got, _nhwc(pool(_torch_nchw(torch, x))))
    assert got.max() < 0


@pytest.mark.torch
def test_max_pool_gradients_follow_torch_indices_under_jit():
  """Ties (ReLU zeros, repeated values) send the gradient where torch's indices point: the
  first maximum in raster order. Checked on compiled gradients, where XLA may recompute the
  input with other rounding."""
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  for h, w, size in [(4, 5, 6), (7, 5, 3), (8, 10, 6), (3, 3, 2), (13, 17, (4, 3))]:
    # ReLU-like: a third zeros; values rounded so that nonzero ties occur as well.
    x = np.round(np.maximum(rng.normal(size=(2, h, w, 3)), 0) * 4).astype(np.float32)
    size_hw = ops._pair(size, 'size')
    g = rng.normal(size=(2, *size_hw, 3)).astype(np.float32)

    @jax.jit
    def grads(v, g=g, size=size):
      adaptive = jax.grad(lambda u: jnp.sum(ops.adaptive_max_pool2d(u, size) * g))(v)
      stem = jax.grad(lambda u: jnp.sum(ops.max_pool_3x3_s2(u)))(v)
      return adaptive, stem

    got, got_stem = grads(jnp.asarray(x))
    xt = _torch_nchw(torch, x).requires_grad_(True)
    pooled = torch.nn.functional.adaptive_max_pool2d(xt, size)
    (pooled * _torch_nchw(torch, g)).sum().backward()
    # Overlapping windows sum several gradients (in another order); a misrouted one is O(1).
    np.testing.assert_allclose(got, _nhwc(xt.grad), rtol=0, atol=1e-6, err_msg=f'{h}x{w} {size}')
    xt.grad = None
    torch.nn.functional.max_pool2d(xt, 3, 2, 1).sum().backward()
    np.testing.assert_array_equal(got_stem, _nhwc(xt.grad), err_msg=f'stem {h}x{w}')


def test_adaptive_avg_pool_known_windows():
  """PyTorch's rule by hand: 7 -> 3 uses windows [0, 3), [2, 5), [4, 7)."""
  assert ops.adaptive_windows(7, 3) == [(0, 3), (2, 5), (4, 7)]
  assert ops.adaptive_windows(2, 5) == [(0, 1), (0, 1), (0, 2), (1, 2), (1, 2)]
  x = jnp.arange(7, dtype=jnp.float32).reshape(1, 7, 1, 1)
  np.testing.assert_allclose(ops.adaptive_avg_pool2d(x, (3, 1))[0, :, 0, 0], [1.0, 3.0, 5.0])
  np.testing.assert_allclose(ops.adaptive_max_pool2d(x, (3, 1))[0, :, 0, 0], [2.0, 4.0, 6.0])


def test_resize_known_values():
  """align_corners=True keeps the corners and spaces samples (in-1)/(out-1) apart."""
  x = jnp.asarray([0.0, 3.0], jnp.float32).reshape(1, 1, 2, 1)
  np.testing.assert_allclose(ops.resize_bilinear(x, (1, 4))[0, 0, :, 0], [0.0, 1.0, 2.0, 3.0])
  half = ops.resize_bilinear(x, (1, 4), align_corners=False)[0, 0, :, 0]
  np.testing.assert_allclose(half, [0.0, 0.75, 2.25, 3.0])


@pytest.mark.parametrize(
  'op', [ops.adaptive_avg_pool2d, ops.adaptive_max_pool2d, ops.resize_bilinear]
)
def test_bfloat16_keeps_dtype_and_values(op):
  x = jnp.asarray(_random((2, 13, 17, 8)))
  size = (6, 6) if op is not ops.resize_bilinear else (30, 45)
  full = op(x, size)
  half = op(x.astype(jnp.bfloat16), size)
  assert half.dtype == jnp.bfloat16
  assert half.shape == full.shape
  # bfloat16 keeps 8 significant bits: inputs and outputs are each rounded once.
  np.testing.assert_allclose(np.asarray(half, np.float32), full, rtol=0, atol=0.04)


def test_ops_inside_jit_match_eager():
  @jax.jit
  def f(x):
    pooled = ops.adaptive_avg_pool2d(x, 6) + ops.adaptive_max_pool2d(x, 6)
    return ops.resize_bilinear(pooled, x.shape[1:3]), ops.max_pool_3x3_s2(x)

  x = jnp.asarray(_random((2, 13, 17, 3)))
  got, stem = f(x)
  eager = ops.adaptive_avg_pool2d(x, 6) + ops.adaptive_max_pool2d(x, 6)
  np.testing.assert_allclose(got, ops.resize_bilinear(eager, (13, 17)), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(stem, ops.max_pool_3x3_s2(x))
  assert got.shape == (2, 13, 17, 3) and stem.shape == (2, 7, 9, 3)


def test_bad_arguments_raise_clear_errors():
  x = jnp.zeros((2, 5, 5, 3))
  with pytest.raises(ValueError, match='output_size'):
    ops.adaptive_avg_pool2d(x, 0)
  with pytest.raises(ValueError, match='NHWC'):
    ops.resize_bilinear(jnp.zeros((5, 5, 3)), (2, 2))
  with pytest.raises(ValueError, match='size'):
    ops.resize_bilinear(x, (2, 2, 2))


def test_height_split_changes_only_the_pooling_order_and_only_inside():
  x = jnp.asarray(_random((1, 9, 7, 2), seed=3))

  def rows_after_first_sum():
    jaxpr = jax.make_jaxpr(lambda v: ops.adaptive_avg_pool2d(v, 3))(x)
    first = next(e for e in jaxpr.eqns if e.primitive.name == 'reduce_sum')
    return first.outvars[0].aval.shape[1]

  plain = ops.adaptive_avg_pool2d(x, 3)
  assert rows_after_first_sum() == 3  # height first: 9 rows to 3
  with ops.height_split():
    split = ops.adaptive_avg_pool2d(x, 3)
    assert rows_after_first_sum() == 9  # width first: the rows stay
  np.testing.assert_allclose(split, plain, rtol=1e-6)
  assert rows_after_first_sum() == 3  # reset after
