"""A convolution computed in a low precision whose parameter gradients come out in float32.

With bfloat16 compute and float32 parameters, autodiff computes a kernel's gradient in
bfloat16 (the cotangent of the kernel's bfloat16 copy) and casts it to float32 only after.
Under a batch-sharded jit each device's weight-gradient convolution gives a partial sum,
and XLA all-reduces it where it is made: in bfloat16, so the sum over the devices is
rounded to 8 bits of mantissa before the cast. Here the weight-gradient convolution
accumulates into float32 (`preferred_element_type`) and the bias gradient sums in float32,
so the partial sums, their all-reduce and the gradient are float32; the input gradient and
the forward stay in the compute dtype. Design: docs/design.md#float32-gradients
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

# (x [B, H, W, in], kernel [k, k, in, out], stride, dilation, pad) -> [B, H', W', out].
ConvFn = Callable[[jax.Array, jax.Array, int, int, int], jax.Array]


def weight_grad(
  x: jax.Array, dy: jax.Array, kernel_size: int, stride: int, dilation: int, pad: int
) -> jax.Array:
  """d(conv2d(x, w)) / dw as one convolution, accumulated and returned in float32.

  dW[i, j, c, o] = sum over (b, h, w) of x_pad[b, h s + i d, w s + j d, c] dy[b, h, w, o]:
  a convolution of x (its channels as the batch, its batch as the contracted feature) with
  dy as the kernel, window stride d and kernel dilation s (what JAX's transpose rule of a
  convolution builds, with a float32 result).

  Args:
    x: [B, H, W, in], the convolution's input.
    dy: [B, H', W', out], the cotangent of its output.
    kernel_size, stride, dilation, pad: those of the convolution.

  Returns:
    [k, k, in, out] float32.
  """
  k, s, d = kernel_size, stride, dilation
  out = jax.lax.conv_general_dilated(
    x,
    dy,
    window_strides=(d, d),
    padding=((pad, pad), (pad, pad)),
    rhs_dilation=(s, s),
    dimension_numbers=('CHWN', 'IHWO', 'HWNC'),
    preferred_element_type=jnp.float32,
  )
  # Rows and columns of a strided convolution's padded input that no window reached give
  # taps past k: drop them.
  return out[:k, :k]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5, 6))
def _conv(conv2d: ConvFn, x, kernel, bias, stride: int, dilation: int, pad: int) -> jax.Array:
  y = conv2d(x, kernel.astype(x.dtype), stride, dilation, pad)
  return y if bias is None else y + bias.astype(x.dtype)


def _conv_fwd(conv2d, x, kernel, bias, stride, dilation, pad):
  low = kernel.astype(x.dtype)
  y = conv2d(x, low, stride, dilation, pad)
  y = y if bias is None else y + bias.astype(x.dtype)
  # The float32 kernel and bias are parameters, live anyway: kept for their dtypes.
  return y, (x, low, kernel, bias)


def _conv_bwd(conv2d, stride, dilation, pad, residuals, dy):
  x, low, kernel, bias = residuals
  # linear_transpose, not vjp: no dead recomputation of the forward in the backward program.
  (dx,) = jax.linear_transpose(lambda x: conv2d(x, low, stride, dilation, pad), x)(dy)
  dk = weight_grad(x, dy, low.shape[0], stride, dilation, pad).astype(kernel.dtype)
  db = None
  if bias is not None:
    db = jnp.sum(dy, axis=(0, 1, 2), dtype=jnp.float32).astype(bias.dtype)
  return dx, dk, db


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(
  conv2d: ConvFn,
  x: jax.Array,
  kernel: jax.Array,
  bias: jax.Array | None,
  stride: int,
  dilation: int,
  pad: int,
) -> jax.Array:
  """conv2d(x, kernel) (+ bias) in x's dtype, with kernel and bias gradients in theirs.

  Args:
    conv2d: layers.conv2d, the plain convolution.
    x: [B, H, W, in] in the compute dtype (bfloat16).
    kernel: [k, k, in, out] in the parameter dtype (float32).
    bias: [out] in the parameter dtype, or None.
    stride, dilation, pad: those of the convolution.

  Returns:
    [B, H', W', out] in x's dtype.
  """
  return _conv(conv2d, x, kernel, bias, stride, dilation, pad)
