"""psp_jax.models.cpu_conv_grad: the weight gradient as matrix products equals XLA's own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psp_jax.models import cpu_conv_grad, layers


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
