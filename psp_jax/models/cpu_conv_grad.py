"""The convolution weight gradient as matrix products on the CPU, and which convolutions use it.

1x1 kernels on the CPU only, chosen when the program is lowered: GPU and TPU programs are
plain autodiff. Design: docs/design.md#the-cpu-weight-gradient
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

# (x [B, H, W, in], kernel [k, k, in, out], stride, dilation, pad) -> [B, H', W', out].
ConvFn = Callable[[jax.Array, jax.Array, int, int, int], jax.Array]

# Kernel sizes whose weight gradient is computed by conv_weight_grad when the program runs on
# the CPU; other platforms always keep XLA's own weight gradient.
CPU_DOT_WEIGHT_GRAD_KERNELS: tuple[int, ...] = (1,)


def conv_weight_grad(
  x: jax.Array, dy: jax.Array, kernel_size: int, stride: int, dilation: int, pad: int
) -> jax.Array:
  """Gradient of layers.conv2d with respect to its kernel, as one matrix product per kernel tap.

  dW[i, j] = sum over (b, h, w) of x_pad[b, h s + i d, w s + j d, :]^T dy[b, h, w, :]: a
  [in, B H' W'] x [B H' W', out] product of a strided slice of the padded input.

  Args:
    x: [B, H, W, in], the convolution's input.
    dy: [B, H', W', out], the cotangent of its output.
    kernel_size, stride, dilation, pad: those of the convolution.

  Returns:
    [k, k, in, out], the kernel's cotangent (x's dtype).
  """
  k, s, d = kernel_size, stride, dilation
  b, ho, wo, cout = dy.shape
  cin = x.shape[-1]
  if pad:
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = dy.reshape(-1, cout)
  taps = []
  for i in range(k):
    for j in range(k):
      start = (0, i * d, j * d, 0)
      limit = (b, i * d + (ho - 1) * s + 1, j * d + (wo - 1) * s + 1, cin)
      patch = jax.lax.slice(x, start, limit, (1, s, s, 1)).reshape(-1, cin)
      taps.append(jax.lax.dot_general(patch, dy, (((0,), (0,)), ((), ()))))
  return jnp.stack(taps).reshape(k, k, cin, cout)


# Why conv2d is an argument: layers owns the plain convolution and its Conv calls conv2d_for,
# so importing layers here would make an import cycle.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4, 5))
def _conv_cpu_dot_weight_grad(
  conv2d: ConvFn, x: jax.Array, kernel: jax.Array, stride: int, dilation: int, pad: int
) -> jax.Array:
  return conv2d(x, kernel, stride, dilation, pad)


def _conv_fwd(conv2d, x, kernel, stride, dilation, pad):
  return conv2d(x, kernel, stride, dilation, pad), (x, kernel)


def _conv_bwd(conv2d, stride, dilation, pad, residuals, dy):
  x, kernel = residuals
  # linear_transpose, not vjp: no dead recomputation of the forward in the backward program.
  (dx,) = jax.linear_transpose(lambda x: conv2d(x, kernel, stride, dilation, pad), x)(dy)

  def xla(x, dy):
    return jax.linear_transpose(lambda w: conv2d(x, w, stride, dilation, pad), kernel)(dy)[0]

  def dots(x, dy):
    dw = conv_weight_grad(x, dy, kernel.shape[0], stride, dilation, pad)
    return dw.astype(kernel.dtype)

  return dx, jax.lax.platform_dependent(x, dy, cpu=dots, default=xla)


_conv_cpu_dot_weight_grad.defvjp(_conv_fwd, _conv_bwd)


def with_cpu_dot_weight_grad(conv2d: ConvFn) -> ConvFn:
  """conv2d whose kernel gradient on the CPU is conv_weight_grad (XLA's own elsewhere).

  Args:
    conv2d: layers.conv2d, the plain convolution.

  Returns:
    A function with conv2d's arguments, result and input gradient.
  """
  return functools.partial(_conv_cpu_dot_weight_grad, conv2d)


def conv2d_for(kernel_size: int, conv2d: ConvFn) -> ConvFn:
  """The convolution function Conv runs for a kernel size.

  Args:
    kernel_size: the square kernel's side.
    conv2d: layers.conv2d, the plain convolution.

  Returns:
    with_cpu_dot_weight_grad(conv2d) for CPU_DOT_WEIGHT_GRAD_KERNELS, else conv2d itself.
  """
  # Read at call time, so benchmarks/step_variants.py can compare other kernel sets.
  if kernel_size in CPU_DOT_WEIGHT_GRAD_KERNELS:
    return with_cpu_dot_weight_grad(conv2d)
  return conv2d
