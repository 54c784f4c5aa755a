"""mmsegmentation's training augmentation (its PSPNet 512 configs) on one example, in TF.

RandomResize, RandomCrop (cat_max_ratio 0.75), RandomFlip, PhotoMetricDistortion and the pad
to the crop, as mmseg 1.2.2 / mmcv 2.1.0 run them, each random op on its own stateless seed,
OpenCV's uint8 arithmetic bit for bit. Design: docs/design.md#mmseg-augmentation
"""

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from psp_jax.data import geometry, transforms

FLIP_P = 0.5  # RandomFlip(prob=0.5)
CROP_TRIES = 10  # RandomCrop re-draws at most 10 times; the 11th window is kept unchecked
PADS = ('mean', 'black')

# PhotoMetricDistortion's defaults.
BRIGHTNESS_DELTA = 32
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
HUE_DELTA = 18

# cv2.cvtColor(COLOR_BGR2HSV) on uint8: 12-bit fixed point with these division tables
# (hue on 0..179); entries are rounded half to even, as cv2's saturate_cast<int>(double).
_HSV_SHIFT = 12
_DIVISORS = np.arange(1, 256, dtype=np.float64)
_SDIV = np.concatenate([[0], np.rint((255 << _HSV_SHIFT) / _DIVISORS)]).astype(np.int32)
_HDIV = np.concatenate([[0], np.rint((180 << _HSV_SHIFT) / (6 * _DIVISORS))]).astype(np.int32)
# COLOR_HSV2BGR's SIMD loop takes 4 vectors of 8 float32 (AVX2) at a time.
SIMD_BLOCK = 32
# COLOR_HSV2BGR: which of (v, p, q, t) each of R, G, B takes in each of the six hue sectors.
_SECTORS_RGB = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


# ----------------------------------------------------------------------------------------
# RandomResize.


def resize_ratio(seed: tf.Tensor, ratio_range: Sequence[float]) -> tf.Tensor:
  """RandomResize's ratio, uniform in [min, max) (float64 scalar)."""
  return tf.random.stateless_uniform([], seed, *ratio_range, dtype=tf.float64)


def rescale_size(height, width, scale: Sequence[int], ratio) -> tuple[tf.Tensor, tf.Tensor]:
  """(new_h, new_w) of RandomResize at `ratio`: mmcv rescale_size of (int(s * ratio) ...).

  The target edges are int(scale_i * ratio); the factor is min(long edge / long side,
  short edge / short side) and each side becomes int(side * factor + 0.5), in double.

  Returns:
    int32 scalars, at least 1.
  """
  ratio = tf.cast(ratio, tf.float64)
  edges = [tf.floor(float(s) * ratio) for s in scale]
  long, short = tf.maximum(*edges), tf.minimum(*edges)
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  factor = tf.minimum(long / tf.maximum(h, w), short / tf.minimum(h, w))
  new_h = tf.maximum(tf.floor(h * factor + 0.5), 1.0)
  new_w = tf.maximum(tf.floor(w * factor + 0.5), 1.0)
  return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def resize_taps(in_size, out_size, start, count, clamp: bool):
  """cv2.resize INTER_LINEAR's fixed-point taps of output rows [start, start + count).

  As OpenCV computes them for uint8: the source position (d + 0.5) * (1 / (out / in)) - 0.5
  in double, then float32; its floor and fraction; weights round((1 - f) * 2048) and
  round(f * 2048). Along x (clamp=True) a position before the first or past the last pixel
  takes that pixel whole; along y the weights are left as they are and only the rows are
  clamped (OpenCV does not clamp fy).

  Returns:
    i0, i1: int32 [count] source indices; w0, w1: int32 [count] weights out of 2048.
  """
  scale = 1.0 / (tf.cast(out_size, tf.float64) / tf.cast(in_size, tf.float64))
  dst = tf.cast(tf.range(start, start + count), tf.float64)
  f = tf.cast((dst + 0.5) * scale - 0.5, tf.float32)
  s = tf.floor(f)
  f = f - s
  s = tf.cast(s, tf.int32)
  last = in_size - 1
  if clamp:
    f = tf.where((s < 0) | (s >= last), 0.0, f)
    s = tf.clip_by_value(s, 0, last)
  w1 = tf.cast(tf.round(f * 2048.0), tf.int32)
  w0 = tf.cast(tf.round((1.0 - f) * 2048.0), tf.int32)
  return tf.clip_by_value(s, 0, last), tf.clip_by_value(s + 1, 0, last), w0, w1


def resize_window(image: tf.Tensor, size: tf.Tensor, window: Sequence[tf.Tensor]) -> tf.Tensor:
  """A window of cv2.resize(image, size, INTER_LINEAR) of a uint8 image, bit for bit.

  OpenCV's uint8 path: a horizontal pass in integers (weights out of 2048), then the
  vertical one as its SIMD code does it, ((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16),
  rounded by (v + 2) >> 2 (an exact 2x shrink, OpenCV's INTER_AREA, gives the same).

  Args:
    image: [H, W, 3] uint8 (or float of integer values).
    size: int32 [2], the (h, w) of the whole resized image.
    window: (top, left, height, width) of the window in the resized image.

  Returns:
    float32 [height, width, 3] of integer values 0..255.
  """
  top, left, height, width = window
  shape = tf.shape(image)
  image = tf.cast(image, tf.int32)
  r0, r1, b0, b1 = resize_taps(shape[0], size[0], top, height, clamp=False)
  c0, c1, a0, a1 = resize_taps(shape[1], size[1], left, width, clamp=True)
  a0, a1 = a0[None, :, None], a1[None, :, None]

  def horizontal(rows):  # [height, W, 3] -> [height, width, 3], exact integers
    return tf.gather(rows, c0, axis=1) * a0 + tf.gather(rows, c1, axis=1) * a1

  shift = tf.bitwise.right_shift  # every value here is >= 0
  s0, s1 = horizontal(tf.gather(image, r0)), horizontal(tf.gather(image, r1))
  v = shift(shift(s0, 4) * b0[:, None, None], 16) + shift(shift(s1, 4) * b1[:, None, None], 16)
  return tf.cast(tf.clip_by_value(shift(v + 2, 2), 0, 255), tf.float32)


def label_window(label: tf.Tensor, size: tf.Tensor, window: Sequence[tf.Tensor]) -> tf.Tensor:
  """A window of the label resized to `size` with cv2 INTER_NEAREST ([height, width])."""
  top, left, height, width = window
  shape = tf.shape(label)
  rows = geometry.nearest_indices(size[0], shape[0])[top : top + height]
  cols = geometry.nearest_indices(size[1], shape[1])[left : left + width]
  return tf.gather(tf.gather(label, rows), cols, axis=1)


# ----------------------------------------------------------------------------------------
# RandomCrop with cat_max_ratio.


def crop_candidates(seed: tf.Tensor, size: tf.Tensor, crop_size: Sequence[int]) -> tf.Tensor:
  """The CROP_TRIES + 1 windows RandomCrop may draw, int32 [11, 2] (top, left).

  Each offset is uniform in [0, max(side - crop, 0)] (np.random.randint(0, margin + 1)).
  """
  seeds = transforms.split_seed(seed, 2)
  return tf.stack(
    [
      tf.random.stateless_uniform(
        [CROP_TRIES + 1], s, 0, tf.maximum(side - crop, 0) + 1, dtype=tf.int32
      )
      for s, side, crop in zip(seeds, tf.unstack(size), crop_size, strict=True)
    ],
    axis=1,
  )


def crop_accepted(label: tf.Tensor, cat_max_ratio: float, ignore_label: int) -> tf.Tensor:
  """RandomCrop's test of a label crop: two or more classes, the largest < cat_max_ratio.

  Classes are the values other than ignore_label; the share is of the labelled pixels.
  """
  counts = tf.math.bincount(tf.cast(tf.reshape(label, [-1]), tf.int32), minlength=256)
  counts = tf.tensor_scatter_nd_update(counts, [[ignore_label]], [0])
  present = tf.reduce_sum(tf.cast(counts > 0, tf.int32))
  total = tf.maximum(tf.reduce_sum(counts), 1)
  share = tf.cast(tf.reduce_max(counts), tf.float64) / tf.cast(total, tf.float64)
  return (present > 1) & (share < cat_max_ratio)


def choose_crop(
  label: tf.Tensor,
  size: tf.Tensor,
  seed: tf.Tensor,
  crop_size: Sequence[int],
  cat_max_ratio: float,
  ignore_label: int,
) -> tuple[tf.Tensor, ...]:
  """RandomCrop's window in the label resized to `size`: (top, left, height, width).

  The window is min(crop, side) a side. With cat_max_ratio < 1 the first of up to
  CROP_TRIES candidates whose label passes crop_accepted is taken, else the next one.
  """
  height = tf.minimum(crop_size[0], size[0])
  width = tf.minimum(crop_size[1], size[1])
  candidates = crop_candidates(seed, size, crop_size)

  def rejected(k):
    window = (candidates[k, 0], candidates[k, 1], height, width)
    crop = label_window(label, size, window)
    return tf.logical_not(crop_accepted(crop, cat_max_ratio, ignore_label))

  k = tf.constant(0)
  if cat_max_ratio < 1:
    k = tf.while_loop(
      lambda k: tf.cond(k < CROP_TRIES, lambda: rejected(k), lambda: False),
      lambda k: (k + 1,),
      (k,),
    )[0]
  return candidates[k, 0], candidates[k, 1], height, width


# ----------------------------------------------------------------------------------------
# PhotoMetricDistortion.


def rgb_to_hsv(image: tf.Tensor) -> tf.Tensor:
  """cv2.cvtColor(COLOR_RGB2HSV) of uint8 values: int32 [..., 3] (H 0..179, S, V 0..255)."""
  rgb = tf.cast(image, tf.int32)
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  v = tf.maximum(tf.maximum(r, g), b)
  diff = v - tf.minimum(tf.minimum(r, g), b)
  half = 1 << (_HSV_SHIFT - 1)
  # floordiv is the arithmetic right shift cv2 does on (possibly negative) ints.
  s = (diff * tf.gather(_SDIV, v) + half) // (1 << _HSV_SHIFT)
  h = tf.where(v == r, g - b, tf.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
  h = (h * tf.gather(_HDIV, diff) + half) // (1 << _HSV_SHIFT)
  h = tf.where(h < 0, h + 180, h)
  return tf.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: tf.Tensor) -> tf.Tensor:
  """cv2.cvtColor(COLOR_HSV2RGB) of uint8 HSV [H, W, 3] (H 0..179): float32 of 0..255.

  As OpenCV 4.10 computes it on x86 with AVX2: float32 with the 1 - s * h terms fused
  (FMA, emulated in float64); each row in blocks of SIMD_BLOCK pixels whose result times
  255 is truncated, the row's remaining pixels (scalar code) rounded half to even.
  """
  width = tf.shape(hsv)[1]
  hsv = tf.cast(hsv, tf.float32)
  h = hsv[..., 0] * tf.constant(np.float32(6.0) / np.float32(180.0))
  s = hsv[..., 1] * np.float32(1 / 255)
  v = hsv[..., 2] * np.float32(1 / 255)
  sector = tf.math.floor(h)  # h >= 0: truncation
  h = h - sector
  s64, h64 = tf.cast(s, tf.float64), tf.cast(h, tf.float64)
  q = v * tf.cast(1.0 - s64 * h64, tf.float32)
  t = v * tf.cast(1.0 - s64 * tf.cast(1.0 - h, tf.float64), tf.float32)
  table = tf.stack([v, v * (1.0 - s), q, t], axis=-1)  # v, p, q, t
  index = tf.gather(_SECTORS_RGB, tf.cast(sector, tf.int32))
  rgb = tf.gather(table, index, batch_dims=2) * 255.0
  simd = tf.range(width) < width // SIMD_BLOCK * SIMD_BLOCK
  rgb = tf.where(simd[None, :, None], tf.math.floor(rgb), tf.round(rgb))
  return tf.clip_by_value(rgb, 0.0, 255.0)


def _convert(x: tf.Tensor, alpha=1.0, beta=0.0) -> tf.Tensor:
  """PhotoMetricDistortion.convert: float32 x * alpha + beta, clipped, cast to uint8 (floor)."""
  return tf.floor(tf.clip_by_value(x * alpha + beta, 0.0, 255.0))


def photometric_draws(
  seed: tf.Tensor,
  brightness_delta: float = BRIGHTNESS_DELTA,
  contrast_range: Sequence[float] = CONTRAST_RANGE,
  saturation_range: Sequence[float] = SATURATION_RANGE,
  hue_delta: int = HUE_DELTA,
) -> dict[str, tf.Tensor]:
  """PhotoMetricDistortion's random numbers: four coins, the contrast mode and four values.

  Returns:
    {'brightness', 'contrast', 'saturation', 'hue': bool (applied, each with p 0.5),
    'contrast_last': bool (mmseg's mode 0: contrast after the HSV steps), 'beta',
    'alpha', 'saturation_alpha': float32, 'hue_delta': int32 in [-delta, delta)}.
  """
  seeds = transforms.split_seed(seed, 9)

  def uniform(s, low, high):
    # numpy's uniform is float64; the float32 image arithmetic rounds it to float32.
    return tf.cast(tf.random.stateless_uniform([], s, low, high, dtype=tf.float64), tf.float32)

  return dict(
    brightness=transforms.coin(seeds[0], 0.5),
    beta=uniform(seeds[1], -brightness_delta, brightness_delta),
    contrast_last=transforms.coin(seeds[2], 0.5),
    contrast=transforms.coin(seeds[3], 0.5),
    alpha=uniform(seeds[4], *contrast_range),
    saturation=transforms.coin(seeds[5], 0.5),
    saturation_alpha=uniform(seeds[6], *saturation_range),
    hue=transforms.coin(seeds[7], 0.5),
    # np.random.randint(-delta, delta) excludes delta.
    hue_delta=tf.random.stateless_uniform([], seeds[8], -hue_delta, hue_delta, dtype=tf.int32),
  )


def photometric_apply(image: tf.Tensor, draws: dict[str, tf.Tensor]) -> tf.Tensor:
  """PhotoMetricDistortion.transform with given draws, on uint8 values [H, W, 3] (RGB).

  Order: brightness; contrast (unless contrast_last); saturation; hue; contrast (if
  contrast_last). Each step rounds back to uint8 as mmseg's does.

  Returns:
    float32 [H, W, 3] of integer values 0..255.
  """
  image = tf.cast(image, tf.float32)

  def maybe(flag, fn, x):
    return tf.cond(flag, lambda: fn(x), lambda: x)

  def contrast(x):
    return _convert(x, alpha=draws['alpha'])

  def saturation(x):
    hsv = rgb_to_hsv(x)
    sat = _convert(tf.cast(hsv[..., 1], tf.float32), alpha=draws['saturation_alpha'])
    return hsv_to_rgb(tf.stack([hsv[..., 0], tf.cast(sat, tf.int32), hsv[..., 2]], -1))

  def hue(x):
    hsv = rgb_to_hsv(x)
    shifted = tf.math.floormod(hsv[..., 0] + draws['hue_delta'], 180)
    return hsv_to_rgb(tf.stack([shifted, hsv[..., 1], hsv[..., 2]], -1))

  image = maybe(draws['brightness'], lambda x: _convert(x, beta=draws['beta']), image)
  image = maybe(draws['contrast'] & ~draws['contrast_last'], contrast, image)
  image = maybe(draws['saturation'], saturation, image)
  image = maybe(draws['hue'], hue, image)
  return maybe(draws['contrast'] & draws['contrast_last'], contrast, image)


def photometric_distortion(image: tf.Tensor, seed: tf.Tensor, **ranges) -> tf.Tensor:
  """PhotoMetricDistortion of uint8 values [H, W, 3]; ranges as photometric_draws."""
  return photometric_apply(image, photometric_draws(seed, **ranges))


# ----------------------------------------------------------------------------------------
# The chain.


def mmseg_augment(
  example: transforms.Example,
  seed: tf.Tensor,
  *,
  crop_size: Sequence[int],
  scale: Sequence[int] = (2048, 512),
  ratio_range: Sequence[float] | None = (0.5, 2.0),
  cat_max_ratio: float = 0.75,
  flip: bool = True,
  photometric: bool = True,
  pad: str = 'mean',
  ignore_label: int = 255,
) -> transforms.Example:
  """mmseg's training augmentation of one example.

  Args:
    example: {'image': uint8 [H, W, 3] RGB, 'label': uint8 [H, W]}.
    seed: [2] int stateless seed; each op gets its own seed split from it.
    crop_size: (height, width) of the output (RandomCrop's crop_size).
    scale: RandomResize's scale, (long, short) edges at ratio 1 (e.g. (2048, 512)).
    ratio_range: RandomResize's ratio_range, or None for a plain resize to fit `scale`.
    cat_max_ratio: RandomCrop's; 1.0 takes the first window.
    flip: RandomFlip with p 0.5.
    photometric: PhotoMetricDistortion.
    pad: where the image is smaller than the crop it is padded at the bottom and right
      with 'mean' (SegDataPreProcessor pads the normalised image with 0; the 0.x configs
      that trained the zoo too) or 'black' (1.x's VOC config pads raw pixels with 0).
    ignore_label: label padding and RandomCrop's ignore_index.

  Returns:
    {'image': float32 [crop_h, crop_w, 3] normalised, 'label': int32 [crop_h, crop_w]}.
  """
  if pad not in PADS:
    raise ValueError(f'pad must be one of {PADS}, got {pad!r}')
  crop_h, crop_w = crop_size
  seeds = transforms.split_seed(seed, 4)
  image, label = example['image'], example['label']
  shape = tf.shape(label)
  ratio = resize_ratio(seeds[0], ratio_range) if ratio_range is not None else 1.0
  size = tf.stack(rescale_size(shape[0], shape[1], scale, ratio))

  window = choose_crop(label, size, seeds[1], crop_size, cat_max_ratio, ignore_label)
  image = resize_window(image, size, window)
  label = label_window(label, size, window)
  if flip:
    image, label = geometry.flip_if(transforms.coin(seeds[2], FLIP_P), image, label)
  if photometric:
    image = photometric_distortion(image, seeds[3])

  paddings = [[0, crop_h - window[2]], [0, crop_w - window[3]], [0, 0]]
  if pad == 'black':  # Raw 0 before normalising.
    image = transforms.normalize(tf.pad(image, paddings))
  else:  # 0 after normalising: the mean colour.
    image = tf.pad(transforms.normalize(image), paddings)
  label = tf.pad(label, paddings[:2], constant_values=ignore_label)
  return {
    'image': tf.ensure_shape(image, [crop_h, crop_w, 3]),
    'label': tf.ensure_shape(tf.cast(label, tf.int32), [crop_h, crop_w]),
  }
