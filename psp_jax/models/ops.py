"""NHWC pooling and resizing ops with PyTorch's exact semantics at any input size."""

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Size = int | tuple[int, int]
_HEIGHT_SPLIT = contextvars.ContextVar('psp_jax_height_split', default=False)


@contextlib.contextmanager
def height_split(split: bool = True) -> Iterator[None]:
  """While tracing a model whose images' height is split over devices (the train step of
  config.spatial_partitions > 1), adaptive_avg_pool2d pools the width first.

  Height first, a window across two devices' rows (bin 3's 20-row windows over 30 rows a
  device) makes XLA gather the whole [B, H, W, C] map; width first, it gathers n_w columns.
  Unsplit, height first moves 1% fewer HBM bytes on TPU (v5e:2x4: 10.74 against 10.86 GB a
  step), so it stays the default. The two orders round differently (float32: 1e-7).
  """
  token = _HEIGHT_SPLIT.set(split)
  try:
    yield
  finally:
    _HEIGHT_SPLIT.reset(token)


def _pair(size: Size, what: str) -> tuple[int, int]:
  """(h, w) of an int or a pair, validated (>= 1)."""
  pair = (size, size) if isinstance(size, int | np.integer) else tuple(size)
  if len(pair) != 2 or not all(isinstance(s, int | np.integer) and s >= 1 for s in pair):
    raise ValueError(f'{what} must be a positive int or a pair of them, got {size!r}.')
  return int(pair[0]), int(pair[1])


def _check_nhwc(x: jax.Array, what: str) -> None:
  if x.ndim != 4:
    raise ValueError(f'{what} expects an NHWC array [B, H, W, C], got shape {x.shape}.')


def adaptive_windows(length: int, n: int) -> list[tuple[int, int]]:
  """[start, end) of each of n adaptive-pooling windows over an axis of `length`.

  Mirrors start_index/end_index of PyTorch's AdaptiveAveragePooling.cpp: start = floor(i*L/n),
  end = ceil((i+1)*L/n), so windows overlap and differ in size when n does not divide L, and
  every window holds at least one element when n > L.
  """
  return [((i * length) // n, -((-(i + 1) * length) // n)) for i in range(n)]


def _pool_axis(x: jax.Array, axis: int, n: int, reduce: Callable[..., jax.Array]) -> jax.Array:
  """Applies `reduce` over each of the n static adaptive windows along one axis."""
  length = x.shape[axis]
  if length == n:
    return x
  if length % n == 0:
    # Equal disjoint windows: a reshape, one reduction (same elements as the slices below).
    shape = (*x.shape[:axis], n, length // n, *x.shape[axis + 1 :])
    return reduce(x.reshape(shape), axis=axis + 1)
  cells = [
    reduce(jax.lax.slice_in_dim(x, start, end, axis=axis), axis=axis, keepdims=True)
    for start, end in adaptive_windows(length, n)
  ]
  return jnp.concatenate(cells, axis=axis)


def adaptive_avg_pool2d(x: jax.Array, output_size: Size) -> jax.Array:
  """torch.nn.functional.adaptive_avg_pool2d for NHWC arrays.

  A window's mean is a mean of means, one axis at a time (height first; width first under
  height_split), so the 2-D pool is done over static slices: exact on every backend (no
  pooling matrix, whose matmul would run at reduced precision on TPU). Sums accumulate in
  float32 at least, as PyTorch accumulates reduced-precision inputs in float.

  Args:
    x: [B, H, W, C].
    output_size: n or (n_h, n_w); may exceed H, W (windows then repeat input cells).

  Returns:
    [B, n_h, n_w, C], dtype of x.
  """
  _check_nhwc(x, 'adaptive_avg_pool2d')
  out_h, out_w = _pair(output_size, 'output_size')
  acc = jnp.promote_types(x.dtype, jnp.float32)

  def mean(v: jax.Array, axis: int, keepdims: bool = False) -> jax.Array:
    return jnp.mean(v, axis=axis, dtype=acc, keepdims=keepdims)

  y = x.astype(acc)
  axes = ((1, out_h), (2, out_w))
  for axis, n in reversed(axes) if _HEIGHT_SPLIT.get() else axes:  # See height_split.
    y = _pool_axis(y, axis, n, mean)
  return y.astype(x.dtype)


def adaptive_max_pool2d(x: jax.Array, output_size: Size) -> jax.Array:
  """torch.nn.functional.adaptive_max_pool2d for NHWC arrays (same windows as the average).

  Args:
    x: [B, H, W, C].
    output_size: n or (n_h, n_w); may exceed H, W.

  Returns:
    [B, n_h, n_w, C], dtype of x.
  """
  _check_nhwc(x, 'adaptive_max_pool2d')
  out_h, out_w = _pair(output_size, 'output_size')
  # Width first, then height: among tied maxima the gradient then goes to the first in raster
  # order (smallest row, then smallest column), the element AdaptiveMaxPoolKernel.cpp picks
  # with its strict `val > maxval` scan.
  return _pool_axis(_pool_axis(x, 2, out_w, _max_by_argmax), 1, out_h, _max_by_argmax)


def _max_by_argmax(v: jax.Array, axis: int, keepdims: bool = False) -> jax.Array:
  """jnp.max as a gather at the first argmax, so the gradient goes to that element.

  jnp.max's gradient finds the maximum by testing input == output; under jit XLA CPU may
  recompute the input with other rounding and the test then fails: in a jitted PSPNet with
  pool='max' the backbone gradients came out 30% wrong (eager was right). A gather's
  gradient follows the index the forward used, like torch's max-pool indices.
  """
  out = jnp.take_along_axis(v, jnp.argmax(v, axis=axis, keepdims=True), axis=axis)
  return out if keepdims else jnp.squeeze(out, axis)


def linear_weights(
  in_size: int, out_size: int, align_corners: bool, dtype: Any = np.float32
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices i0, i1 and weight of i1 for 1-D linear interpolation, PyTorch's rule.

  Mirrors area_pixel_compute_scale / area_pixel_compute_source_index of
  aten/src/ATen/native/UpSample.h (no scale_factor given, no antialiasing), in the same
  arithmetic: torch computes these in the input's opmath type (float32 for float32 and
  bfloat16 inputs); a float64 computation would move samples by up to ~4e-6 pixel at
  upsampled sizes such as 60 -> 473 (1e-5 in values). align_corners=True maps corner to corner,
  src = i * ((in-1)/(out-1)) (0 when out == 1); align_corners=False maps pixel centres,
  src = (in/out) * (i + 0.5) - 0.5, clamped at 0.

  Returns:
    (i0 [out] int32, i1 [out] int32, lambda1 [out] of dtype).
  """
  dt = np.dtype(dtype).type
  i = np.arange(out_size).astype(dt)
  if align_corners:
    scale = dt(in_size - 1) / dt(out_size - 1) if out_size > 1 else dt(0)
    src = scale * i
  else:
    scale = dt(in_size) / dt(out_size)
    # x86 builds of torch contract this multiply-add into one FMA (a single rounding); the
    # float64 product of two float32 values is exact, so this rounds once as well.
    src = (np.float64(scale) * (i + dt(0.5)).astype(np.float64) - 0.5).astype(dt)
    src = np.maximum(src, dt(0))
  i0 = np.minimum(src.astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = np.clip(src - i0.astype(dt), dt(0), dt(1))
  return i0.astype(np.int32), i1.astype(np.int32), lam


def interpolation_matrix(
  in_size: int, out_size: int, align_corners: bool, dtype: Any = np.float32
) -> np.ndarray:
  """[out, in] matrix of 1-D linear interpolation (PyTorch's rule): two weights a row.

  Row i holds 1 - lambda1 at i0 and lambda1 at i1 of `linear_weights` (their sum where the
  two indices meet at the border).
  """
  i0, i1, lam = linear_weights(in_size, out_size, align_corners, dtype)
  matrix = np.zeros((out_size, in_size), np.dtype(dtype))
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, i0), 1 - lam)
  np.add.at(matrix, (rows, i1), lam)
  return matrix


def _resize_axis(x: jax.Array, axis: int, out_size: int, align_corners: bool) -> jax.Array:
  """Linear interpolation along one axis, as a product with the interpolation matrix.

  A product, not two gathers and a lerp: XLA materialises both gathered tensors (each of the
  output's size) in the forward and differentiates them into scatter-adds. For the logits'
  upsample ([B, 473, 473, 150]) the gathers were the largest tensors live at the peak of the
  compiled TPU training step (benchmarks/NOTES.md). HIGHEST precision keeps float32 exact
  on TPU, whose default matmul precision is bfloat16; the zeros add nothing.
  """
  in_size = x.shape[axis]
  if in_size == out_size:
    # Both conventions give the identity when the size does not change.
    return x
  matrix = jnp.asarray(interpolation_matrix(in_size, out_size, align_corners, x.dtype))
  dims = 'abcdefgh'[: x.ndim]
  out = dims.replace(dims[axis], 'z')
  return jnp.einsum(f'{dims},z{dims[axis]}->{out}', x, matrix, precision=jax.lax.Precision.HIGHEST)


def resize_bilinear(x: jax.Array, size: Size, align_corners: bool = True) -> jax.Array:
  """torch.nn.functional.interpolate(mode='bilinear') for NHWC arrays, up or down.

  Unlike jax.image.resize this has align_corners and never antialiases, as PyTorch's
  interpolate with its defaults (antialias=False). Separable: height, then width.
  Reduced-precision inputs are interpolated in float32 (PyTorch's opmath type) and cast back.

  Args:
    x: [B, H, W, C].
    size: output (h, w), or an int for a square output.
    align_corners: PyTorch's flag; PSPNet uses True everywhere.

  Returns:
    [B, h, w, C], dtype of x.
  """
  _check_nhwc(x, 'resize_bilinear')
  out_h, out_w = _pair(size, 'size')
  compute = jnp.promote_types(x.dtype, jnp.float32)
  y = _resize_axis(x.astype(compute), 1, out_h, align_corners)
  y = _resize_axis(y, 2, out_w, align_corners)
  return y.astype(x.dtype)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """nn.MaxPool2d(3, stride=2, padding=1) of the ResNet stem, NHWC.

  PyTorch's max pool pads with -inf (padding never wins), which is what reduce_window does
  with its -inf initial value; the output side is floor((L + 2 - 3) / 2) + 1.

  Args:
    x: [B, H, W, C].

  Returns:
    [B, ceil(H/2), ceil(W/2), C].
  """
  _check_nhwc(x, 'max_pool_3x3_s2')
  # A Python scalar init, not an array: under jit an array init is a tracer, reduce_window
  # then cannot see it is max's identity and falls back to a generic, non-differentiable op.
  init = -jnp.inf
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  return jax.lax.reduce_window(x, init, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), pad)
