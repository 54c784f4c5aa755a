"""Convolution and BatchNorm layers with PyTorch's padding, initialisation and statistics."""

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from psp_jax.models import cpu_conv_grad, mixed_conv

Dtype = Any
Initializer = Callable[..., jax.Array]

# kaiming_normal_(mode='fan_out', nonlinearity='relu') of model/resnet.py (the official
# backbone init): a plain (untruncated) normal with std sqrt(2 / (out * kh * kw)).
RESNET_KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# nn.Conv2d's own reset_parameters (kaiming_uniform_ with a=sqrt(5)): U(+-1/sqrt(fan_in)),
# what the official PPM, cls and aux convs start from (pspnet.py never re-initialises them).
TORCH_DEFAULT_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_default_bias_init(fan_in: int) -> Initializer:
  """nn.Conv2d's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, dilation: int, pad: int) -> jax.Array:
  """NHWC x HWIO convolution with symmetric padding `pad`.

  Args:
    x: [B, H, W, in].
    kernel: [k, k, in, out].
    stride: spatial stride.
    dilation: kernel dilation.
    pad: zeros added on every side.

  Returns:
    [B, H', W', out], H' = floor((H + 2 pad - dilation (k - 1) - 1) / stride) + 1.
  """
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    rhs_dilation=(dilation, dilation),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
  )


class Conv(nn.Module):
  """2-D convolution (NHWC, kernel [kh, kw, in, out]) with torch.nn.Conv2d's padding.

  The padding is explicit and symmetric, dilation * (k - 1) // 2 on every side, as the
  original's Conv2d(padding=dilation) and Conv2d(padding=1); 'SAME' would pad strided convs
  asymmetrically on even sizes and shift every feature map.

  Attributes:
    features: output channels.
    kernel_size: square kernel side (1, 3 or 7 here).
    stride: spatial stride.
    dilation: kernel dilation (atrous rate).
    use_bias: add a learned bias (only the two final classifiers have one).
    kernel_init: initialiser of the kernel [kh, kw, in, out].
    dtype: compute dtype (None: that of the input and parameters).
    param_dtype: dtype of the parameters.
  """

  features: int
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  use_bias: bool = False
  kernel_init: Initializer = RESNET_KERNEL_INIT
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, in] -> [B, H', W', features], H' = floor((H + 2p - d(k-1) - 1) / s) + 1."""
    k, d, s = self.kernel_size, self.dilation, self.stride
    in_features = x.shape[-1]
    kernel = self.param(
      'kernel', self.kernel_init, (k, k, in_features, self.features), self.param_dtype
    )
    bias = None
    if self.use_bias:
      fan_in = in_features * k * k
      bias = self.param('bias', torch_default_bias_init(fan_in), (self.features,), self.param_dtype)
    pad = d * (k - 1) // 2
    if self.dtype is not None and jnp.dtype(self.dtype) != jnp.dtype(self.param_dtype):
      # Computed in self.dtype, the parameters' gradients summed in theirs (mixed_conv).
      return mixed_conv.conv(conv2d, x.astype(self.dtype), kernel, bias, s, d, pad)
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    conv = cpu_conv_grad.conv2d_for(k, conv2d)
    y = conv(x, kernel, s, d, pad)
    if bias is not None:
      y = y + bias
    return y


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d over the last axis, including its running-variance update.

  Differences from flax.linen.BatchNorm, all for parity with PyTorch: the running variance is
  updated with the unbiased batch variance n/(n-1) (the normalisation itself uses the biased
  one, as torch does); the variance is the exact two-pass mean of squared deviations, never
  E[x^2] - E[x]^2; statistics are computed in float32 at least, whatever the compute dtype.
  Under a sharded jax.jit the means over the batch axis are global, which makes this SyncBN
  with no axis_name; inside shard_map pass axis_name to average over devices.

  Attributes:
    momentum: weight of the old running value (Flax's convention: 0.9 == torch's 0.1).
    epsilon: added to the variance (torch's eps).
    dtype: output dtype (None: the input's).
    param_dtype: dtype of scale, bias and the running statistics.
    axis_name: mapped axis to average statistics over (shard_map / pmap only).
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[..., C] -> [..., C]; train uses batch statistics and updates the running ones."""
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), self.param_dtype)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), self.param_dtype)
    acc = jnp.promote_types(jnp.promote_types(x.dtype, self.param_dtype), jnp.float32)
    out_dtype = self.dtype or x.dtype
    if not train:
      mean, var = ra_mean.value.astype(acc), ra_var.value.astype(acc)
      mul = jax.lax.rsqrt(var + self.epsilon) * scale.astype(acc)
      y = (x.astype(acc) - mean) * mul + bias.astype(acc)
      return y.astype(out_dtype)
    n = math.prod(x.shape[:-1])
    if self.axis_name is not None:
      n *= jax.lax.axis_size(self.axis_name)
    if n < 2:
      # torch.nn.functional.batch_norm raises the same in training mode.
      where = '/'.join(self.path) or 'BatchNorm'
      raise ValueError(
        f'{where}: expected more than 1 value per channel when training, got '
        f'input shape {x.shape}. Use a batch of at least 2 (the PPM bin-1 branch pools each '
        'image to one value), or train=False.'
      )
    y, mean, var = _batch_norm_train(
      x, scale.astype(acc), bias.astype(acc), self.epsilon, self.axis_name, out_dtype
    )
    # Flax convention: initialisation never moves the running statistics.
    if not self.is_initializing():
      m = self.momentum
      unbiased = var * (n / (n - 1))
      ra_mean.value = m * ra_mean.value + (1.0 - m) * mean.astype(self.param_dtype)
      ra_var.value = m * ra_var.value + (1.0 - m) * unbiased.astype(self.param_dtype)
    return y


def _statistics(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and biased variance of x (the accumulation dtype), two-pass."""
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  var = jnp.mean(jnp.square(x - mean), axis=axes)
  if axis_name is not None:
    var = jax.lax.pmean(var, axis_name)
  return mean, var


# Training-mode normalisation with the batch-norm gradient written out, for memory: in JAX's
# own derivative the backward reduces dy * (x - mean), and XLA:CPU's YNNPACK reduce fusion
# takes that per-channel mean broadcast to the input's full shape as an operand, which XLA
# then makes in the forward and keeps until the backward: one more input-sized tensor per
# BatchNorm, 1.02 GB at PSPNet-50 2 x 473 (benchmarks/NOTES.md). Here the backward reduces
# dy * x and dy, and subtracts mean * sum(dy) per channel: no input-sized broadcast exists.
# The residuals are x, the mean and 1/std, as PyTorch keeps. The mean and variance outputs
# feed the running statistics only, which are not differentiated: their cotangents are
# ignored.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _batch_norm_train(x, scale, bias, epsilon, axis_name, out_dtype):
  return _batch_norm_train_fwd(x, scale, bias, epsilon, axis_name, out_dtype)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon, axis_name, out_dtype):
  xf = x.astype(scale.dtype)
  mean, var = _statistics(xf, axis_name)
  inv_std = jax.lax.rsqrt(var + epsilon)
  y = ((xf - mean) * (inv_std * scale) + bias).astype(out_dtype)
  return (y, mean, var), (x, mean, inv_std, scale)


def _batch_norm_train_bwd(epsilon, axis_name, out_dtype, residuals, cotangents):
  del epsilon, out_dtype
  x, mean, inv_std, scale = residuals
  dy = cotangents[0].astype(scale.dtype)
  # The barrier keeps XLA from merging this conversion with the forward's: merged, the
  # forward's float32 copy of x (twice a bfloat16 x's bytes) is what is kept for the backward,
  # and on TPU it was written and read again, and relaid out, for every BatchNorm of a
  # bfloat16 step (benchmarks/NOTES.md). x itself is the residual, in its own dtype.
  xf = jax.lax.optimization_barrier(x).astype(scale.dtype)
  axes = tuple(range(x.ndim - 1))
  sum_dy = jnp.sum(dy, axis=axes)
  sum_dy_x = jnp.sum(dy * xf, axis=axes)
  n = math.prod(x.shape[:-1])
  if axis_name is not None:
    # Sums over every device's elements: the input's gradient needs the global means, and a
    # replicated scale and bias get the sum of all devices' contributions (what JAX's own
    # differentiation of a replicated parameter inside shard_map gives).
    sum_dy, sum_dy_x = jax.lax.psum((sum_dy, sum_dy_x), axis_name)
    n *= jax.lax.axis_size(axis_name)
  # sum(dy * (x - mean)), exact in exact arithmetic; in float32 the cancellation costs little
  # at the means BatchNorm inputs have (relative error of dx 6.7e-8 against autodiff's 6.5e-8
  # at |mean| = 10 std, 2.6e-7 against 1.1e-7 at 100 std, measured against float64).
  sum_dy_x_hat = (sum_dy_x - mean * sum_dy) * inv_std
  mean_dy, mean_dy_x_hat = sum_dy / n, sum_dy_x_hat / n
  # dx = (dy - mean(dy) - x_hat * mean(dy * x_hat)) * scale / std as dy * a + x * b + c with
  # per-channel a, b, c.
  a = inv_std * scale
  b = -a * inv_std * mean_dy_x_hat
  c = -a * mean_dy - b * mean
  dx = dy * a + xf * b + c
  return dx.astype(x.dtype), sum_dy_x_hat, sum_dy


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)
