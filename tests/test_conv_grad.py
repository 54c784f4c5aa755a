"""psp_jax.models.cpu_conv_grad: the weight gradient as matrix products equals XLA's own;
psp_jax.models.mixed_conv: bfloat16 convolutions with float32 parameter gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psp_jax.models import cpu_conv_grad, layers, mixed_conv


@pytest.mark.parametrize(
  ('k', 'stride', 'dilation', 'side'),
  [(1, 1, 1, 9), (1, 2, 1, 10), (3, 1, 1, 9), (3, 2, 1, 10), (3, 1, 4, 13), (7, 2, 1, 15)],
)
def test_conv_weight_grad_matches_autodiff(k, stride, dilation, side):
  rng = np.random.default_rng(k * 100 + stride * 10 + dilation)
  x = jnp.asarray(rng.standard_normal((2, side, side + 3, 5)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, 5, 6)), jnp.float32)
  pad = dilation * (k - 1) // 2
  y, vjp = jax.vjp(lambda w: layers.conv2d(x, w, stride, dilation, pad), w)
  dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  want = vjp(dy)[0]
  got = cpu_conv_grad.conv_weight_grad(x, dy, k, stride, dilation, pad)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('k', [1, 3])
def test_custom_vjp_conv_gradients_equal_plain_conv(k):
  rng = np.random.default_rng(k)
  x = jnp.asarray(rng.standard_normal((2, 11, 12, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, 4, 3)), jnp.float32)
  t = jnp.asarray(rng.standard_normal((2, 6, 6, 3)), jnp.float32)

  def loss(conv, x, w):
    return jnp.sum(jnp.tanh(conv(x, w, 2, 1, (k - 1) // 2)) * t)

  custom_conv = cpu_conv_grad.with_cpu_dot_weight_grad(layers.conv2d)
  plain = jax.jit(jax.grad(lambda x, w: loss(layers.conv2d, x, w), (0, 1)))(x, w)
  custom = jax.jit(jax.grad(lambda x, w: loss(custom_conv, x, w), (0, 1)))(x, w)
  for a, b in zip(custom, plain, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # The forward is conv2d itself.
  np.testing.assert_array_equal(
    custom_conv(x, w, 2, 1, (k - 1) // 2),
    layers.conv2d(x, w, 2, 1, (k - 1) // 2),
  )


@pytest.mark.parametrize('k', [1, 3, 7])
def test_conv2d_for_picks_the_custom_vjp_for_the_listed_kernels_only(k):
  x = jnp.zeros((1, 9, 9, 2), jnp.float32)
  w = jnp.zeros((k, k, 2, 3), jnp.float32)
  conv = cpu_conv_grad.conv2d_for(k, layers.conv2d)
  jaxpr = jax.make_jaxpr(lambda x, w: conv(x, w, 1, 1, (k - 1) // 2))(x, w)
  custom = [e for e in jaxpr.eqns if e.primitive.name.startswith('custom_vjp')]
  assert bool(custom) == (k in cpu_conv_grad.CPU_DOT_WEIGHT_GRAD_KERNELS)
  assert (conv is layers.conv2d) == (k not in cpu_conv_grad.CPU_DOT_WEIGHT_GRAD_KERNELS)


@pytest.mark.parametrize(
  ('k', 'stride', 'dilation', 'side'),
  [(1, 1, 1, 9), (1, 2, 1, 10), (3, 1, 1, 9), (3, 2, 1, 10), (3, 2, 1, 11), (3, 1, 4, 13),
   (7, 2, 1, 15)],
)  # fmt: skip
def test_float32_weight_grad_convolution_matches_autodiff(k, stride, dilation, side):
  """mixed_conv.weight_grad: the kernel's gradient as one float32 convolution (11: a row of
  the padded input that no strided window reaches)."""
  rng = np.random.default_rng(k * 100 + stride * 10 + dilation + side)
  x = jnp.asarray(rng.standard_normal((2, side, side + 3, 5)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, 5, 6)), jnp.float32)
  pad = dilation * (k - 1) // 2
  y, vjp = jax.vjp(lambda w: layers.conv2d(x, w, stride, dilation, pad), w)
  dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  got = mixed_conv.weight_grad(x, dy, k, stride, dilation, pad)
  assert got.dtype == jnp.float32 and got.shape == w.shape
  np.testing.assert_allclose(got, vjp(dy)[0], rtol=1e-5, atol=1e-4)


def test_bfloat16_conv_gives_float32_parameter_gradients_summed_in_float32():
  """mixed_conv.conv: bfloat16 x, float32 kernel and bias. The forward and the input
  gradient are autodiff's in bfloat16; the kernel and bias gradients are the float32 sums of
  the same bfloat16 products."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((4, 12, 12, 16)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((3, 3, 16, 8)) * 0.1, jnp.float32)
  b = jnp.asarray(rng.standard_normal(8), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((4, 12, 12, 8)), jnp.bfloat16)

  def mixed(x, w, b):
    return mixed_conv.conv(layers.conv2d, x, w, b, 1, 1, 1)

  def autodiff(x, w, b):  # What layers.Conv did before: cast everything, then convolve.
    return layers.conv2d(x, w.astype(x.dtype), 1, 1, 1) + b.astype(x.dtype)

  def grads(fn, *args):
    y, vjp = jax.vjp(fn, *args)
    return y, vjp(dy.astype(y.dtype))

  y_mixed, (dx_mixed, dw_mixed, db_mixed) = jax.jit(functools.partial(grads, mixed))(x, w, b)
  y_auto, (dx_auto, dw_auto, db_auto) = jax.jit(functools.partial(grads, autodiff))(x, w, b)
  # The float32 truth of the same bfloat16 values.
  f32 = [a.astype(jnp.float32) for a in (x, w, b)]
  _, (_, dw_true, db_true) = jax.jit(
    lambda x, w, b: grads(lambda x, w, b: layers.conv2d(x, w, 1, 1, 1) + b, x, w, b)
  )(*f32)

  np.testing.assert_array_equal(y_mixed, y_auto)
  np.testing.assert_array_equal(dx_mixed, dx_auto)
  assert (dx_mixed.dtype, dw_mixed.dtype, db_mixed.dtype) == (jnp.bfloat16,) + (jnp.float32,) * 2
  np.testing.assert_allclose(dw_mixed, dw_true, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(db_mixed, db_true, rtol=1e-5, atol=1e-5)
  # Autodiff's kernel gradient is a bfloat16 convolution cast to float32; XLA on the CPU
  # runs it in float32 and drops the rounding, so the difference shows only on TPU, where
  # tests/test_preflight.py checks the compiled step's all-reduces.


def test_conv_layer_takes_the_mixed_path_only_below_its_parameter_dtype():
  x = jnp.ones((1, 5, 5, 3), jnp.float32)
  for dtype, mixed in [(jnp.float32, False), (None, False), (jnp.bfloat16, True)]:
    conv = layers.Conv(4, 3, dtype=dtype)
    variables = conv.init(jax.random.key(0), x)
    text = (
      jax.jit(jax.grad(lambda v, conv=conv: conv.apply(v, x).astype(jnp.float32).sum()))
      .lower(variables)
      .as_text()
    )
    # The float32 accumulation of the weight gradient: a bf16 x bf16 -> f32 convolution.
    assert ('xbf16>, tensor<' in text and '-> tensor<3x3x3x4xf32>' in text) == mixed, dtype
