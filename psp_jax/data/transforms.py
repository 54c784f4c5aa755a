"""Training augmentation and evaluation preprocessing as plain TF functions on example dicts.

An example is {'image': [H, W, 3] uint8 or float32 RGB, 'label': [H, W] uint8}. Every random
op takes ONE stateless seed (a [2] int tensor) and applies the same draw to image and label.
The ops mirror hszhao/semseg util/transform.py and tool/test.py, in float32 as the
original's SemData. Design: docs/design.md#training-augmentation
"""

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from psp_jax.data import geometry
from psp_jax.data.normalization import MEAN_RGB, STD_RGB

Example = dict[str, tf.Tensor]

BLUR_SIZE = 5  # RandomGaussianBlur(radius=5): cv2.GaussianBlur(image, (5, 5), 0)


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """num independent stateless seeds derived from one.

  Args:
    seed: [2] int stateless seed.
    num: how many seeds to derive.

  Returns:
    num [2] int seeds.
  """
  return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def _uniform(seed: tf.Tensor, low: float, high: float) -> tf.Tensor:
  """A float64 scalar uniform in [low, high), like `low + (high - low) * random.random()`."""
  return tf.random.stateless_uniform([], seed, low, high, dtype=tf.float64)


def coin(seed: tf.Tensor, p: float) -> tf.Tensor:
  """A coin flip, `random.random() < p` in the original.

  Args:
    seed: [2] int stateless seed.
    p: probability of True.

  Returns:
    bool scalar.
  """
  return tf.random.stateless_uniform([], seed, dtype=tf.float64) < p


def as_float(image: tf.Tensor) -> tf.Tensor:
  """The image as float32, values kept (not rescaled to [0, 1]).

  Args:
    image: [..., C] uint8 or float.

  Returns:
    float32, same shape.
  """
  # Why: SemData.__getitem__ does `image = np.float32(image)` before any transform.
  return tf.cast(image, tf.float32)


def per_channel(image: tf.Tensor, fn, *values: Sequence[float]) -> tf.Tensor:
  """fn(image, *values) with each per-channel vector broadcast over the channels.

  Args:
    image: [H, W, C] (or any other rank, broadcast as usual).
    fn: elementwise function of the image and len(values) float32 tensors.
    *values: [C] vectors, e.g. MEAN_RGB.

  Returns:
    fn's result, [H, W, C].
  """
  # Why: computed on rows of W * C against the vectors tiled W times: TF's broadcast of a [C]
  # vector over the last axis is several times slower on CPU.
  image = tf.convert_to_tensor(image)
  if image.shape.rank != 3:
    return fn(image, *(tf.constant(v, tf.float32) for v in values))
  shape = tf.shape(image)
  rows = tf.reshape(image, [shape[0], -1])
  tiled = [tf.tile(tf.constant(v, tf.float32), shape[1:2]) for v in values]
  return tf.reshape(fn(rows, *tiled), shape)


def centre(image: tf.Tensor) -> tf.Tensor:
  """float32 image - mean, per RGB channel ([H, W, 3]); mean-padding it means padding 0."""
  return per_channel(image, lambda x, m: as_float(x) - m, MEAN_RGB)


def _resize(example: Example, size: tf.Tensor) -> Example:
  """Image bilinear, label nearest to size (h, w), as cv2.resize with dsize would."""
  image = geometry.resize_bilinear(as_float(example['image']), size)
  return {**example, 'image': image, 'label': geometry.resize_nearest(example['label'], size)}


def rescale(example: Example, scale_y: tf.Tensor, scale_x: tf.Tensor) -> Example:
  """Resizes by factors, as RandScale's cv2.resize(None, fx=scale_x, fy=scale_y).

  Args:
    example: {'image': [H, W, 3], 'label': [H, W] uint8}.
    scale_y: float scalar factor for the height.
    scale_x: float scalar factor for the width.

  Returns:
    {'image': float32 [h, w, 3], 'label': uint8 [h, w]}, h = round(H * scale_y) rounded half
    to even like cv2's saturate_cast, w likewise, both at least 1.
  """
  # dtype_hint keeps Python floats in double, as cv2 computes the size.
  factors = [tf.convert_to_tensor(f, dtype_hint=tf.float64) for f in (scale_y, scale_x)]
  factors = tf.stack([tf.cast(f, tf.float64) for f in factors])
  size = tf.cast(tf.round(tf.cast(tf.shape(example['label']), tf.float64) * factors), tf.int32)
  size = tf.maximum(size, 1)
  # Why (a known sub-pixel difference): cv2 given fx maps coordinates with 1 / fx, we with
  # in / out of the rounded size; they differ by < 0.5 / out, under 0.25 px at the far edge.
  return _resize(example, size)


def random_scale(
  example: Example,
  seed: tf.Tensor,
  scale_range: Sequence[float] = (0.5, 2.0),
  aspect_ratio_range: Sequence[float] | None = None,
) -> Example:
  """Resizes by one random factor in scale_range (RandScale).

  Args:
    example: {'image': [H, W, 3], 'label': [H, W] uint8}.
    seed: [2] int stateless seed.
    scale_range: (min, max) of the factor (scale_min / scale_max in the yaml).
    aspect_ratio_range: None (the official default) or (min, max); the width then gets
      factor * sqrt(ratio) and the height factor / sqrt(ratio).

  Returns:
    The resized example: image float32 [h, w, 3], label uint8 [h, w].
  """
  scale_seed, ratio_seed = split_seed(seed, 2)
  factor = _uniform(scale_seed, *scale_range)
  ratio = tf.constant(1.0, tf.float64)
  if aspect_ratio_range is not None:
    ratio = tf.sqrt(_uniform(ratio_seed, *aspect_ratio_range))
  return rescale(example, factor / ratio, factor * ratio)


def _warp_image(image: tf.Tensor, transform: tf.Tensor, size) -> tf.Tensor:
  # Why: cv2 BORDER_CONSTANT with borderValue=mean fills per channel; the TF op takes one fill
  # value, so warp (image - mean) with fill 0: bilinear weights sum to 1, so this is the same.
  warped = geometry.warp(centre(image), transform, size, 'BILINEAR', 0.0)
  return per_channel(warped, tf.add, MEAN_RGB)


def rotate(example: Example, angle: tf.Tensor, ignore_label: int = 255) -> Example:
  """Rotates by angle degrees (counter-clockwise) about (W / 2, H / 2), keeping the size.

  Args:
    example: {'image': [H, W, 3], 'label': [H, W] uint8}.
    angle: float scalar, degrees.
    ignore_label: label value of the area rotated in from outside.

  Returns:
    {'image': float32 [H, W, 3] with the mean colour outside (bilinear), 'label': uint8
    [H, W] with ignore_label outside (nearest)}.
  """
  shape = tf.shape(example['label'])
  transform = geometry.rotation_transform(shape, angle)
  image = _warp_image(example['image'], transform, shape)
  label = geometry.warp_label(example['label'], transform, shape, ignore_label)
  return {**example, 'image': image, 'label': label}


def rotate_draw(seed: tf.Tensor, rotate_range: Sequence[float], p: float):
  """RandRotate's random numbers: whether to rotate, and by how much.

  Args:
    seed: [2] int stateless seed.
    rotate_range: (min, max) degrees.
    p: probability of rotating.

  Returns:
    (bool scalar, float64 scalar angle in degrees); the angle is drawn either way.
  """
  coin_seed, angle_seed = split_seed(seed, 2)
  return coin(coin_seed, p), _uniform(angle_seed, *rotate_range)


def random_rotate(
  example: Example,
  seed: tf.Tensor,
  rotate_range: Sequence[float] = (-10.0, 10.0),
  p: float = 0.5,
  ignore_label: int = 255,
) -> Example:
  """With probability p rotates by a random angle in rotate_range (RandRotate).

  Args:
    example: {'image': [H, W, 3], 'label': [H, W] uint8}.
    seed: [2] int stateless seed.
    rotate_range: (min, max) degrees (rotate_min / rotate_max in the yaml).
    p: probability of rotating.
    ignore_label: label value of the area rotated in from outside.

  Returns:
    {'image': float32 [H, W, 3], 'label': uint8 [H, W]}.
  """
  do_rotate, angle = rotate_draw(seed, rotate_range, p)
  example = {**example, 'image': as_float(example['image'])}
  return tf.cond(do_rotate, lambda: rotate(example, angle, ignore_label), lambda: example)


def gaussian_kernel_1d(size: int, sigma: float = 0.0) -> np.ndarray:
  """The 1-D kernel cv2.getGaussianKernel(size, sigma) returns, float64 [size].

  Why: with sigma <= 0 and an odd size <= 7, OpenCV does not derive sigma from the size but
  uses fixed binomial taps (for 5: [1, 4, 6, 4, 1] / 16, not the sigma-1.1 Gaussian); other
  sizes with sigma <= 0 get sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8.
  """
  if size < 1 or size % 2 == 0:
    raise ValueError(f'Gaussian kernel size must be odd and positive, got {size}.')
  if sigma <= 0 and size <= 7:
    taps = np.array([1.0])
    for _ in range(size - 1):
      taps = np.convolve(taps, [1.0, 1.0])
    return taps / taps.sum()
  if sigma <= 0:
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
  x = np.arange(size) - (size - 1) / 2
  taps = np.exp(-0.5 * (x / sigma) ** 2)
  return taps / taps.sum()


def _filter_valid(x: tf.Tensor, taps: np.ndarray, axis: int, step: int = 1) -> tf.Tensor:
  """'VALID' correlation of 2-D x with a symmetric kernel along axis, taps `step` apart."""
  k = len(taps)
  n = tf.shape(x)[axis] - (k - 1) * step

  def tap(i):
    return x[i * step : i * step + n] if axis == 0 else x[:, i * step : i * step + n]

  # Symmetric taps: pair the mirrored slices to halve the multiplications.
  out = float(taps[k // 2]) * tap(k // 2)
  for i in range(k // 2):
    out += float(taps[i]) * (tap(i) + tap(k - 1 - i))
  return out


def blur_padded(padded: tf.Tensor, size: int, sigma: float = 0.0) -> tf.Tensor:
  """The separable Gaussian blur of an image already padded by size // 2 on every side.

  Args:
    padded: float32 [H + size - 1, W + size - 1, C].
    size: odd kernel size.
    sigma: standard deviation; <= 0 takes OpenCV's default for the size.

  Returns:
    float32 [H, W, C].
  """
  taps = gaussian_kernel_1d(size, sigma)
  shape = tf.shape(padded)
  channels = padded.shape[-1] or shape[2]
  # On rows of W * C values (faster than slicing the middle axis of [H, W, C]); cv2's
  # separable filter also runs along x first, then along y.
  rows = tf.reshape(padded, [shape[0], -1])
  rows = _filter_valid(rows, taps, axis=1, step=channels)
  rows = _filter_valid(rows, taps, axis=0)
  return tf.reshape(rows, [shape[0] - (size - 1), shape[1] - (size - 1), channels])


def gaussian_blur(image: tf.Tensor, size: int = BLUR_SIZE, sigma: float = 0.0) -> tf.Tensor:
  """Separable Gaussian blur of [H, W, C], as cv2.GaussianBlur(image, (size, size), sigma).

  Args:
    image: [H, W, C] uint8 or float; H and W must exceed size // 2.
    size: odd kernel size.
    sigma: standard deviation; <= 0 takes OpenCV's default for the size.

  Returns:
    float32 [H, W, C].
  """
  r = size // 2
  shape = tf.shape(image)
  check = tf.debugging.assert_greater(
    tf.reduce_min(shape[:2]), r, message=f'gaussian_blur: height and width must exceed {r}'
  )
  with tf.control_dependencies([check]):
    # Why: cv2's default border is BORDER_REFLECT_101 (gfedcb|abcdefgh), which is TF's REFLECT.
    padded = tf.pad(as_float(image), [[r, r], [r, r], [0, 0]], mode='REFLECT')
  return blur_padded(padded, size, sigma)


def random_gaussian_blur(example: Example, seed: tf.Tensor, p: float = 0.5) -> Example:
  """With probability p blurs the image only (RandomGaussianBlur: 5x5, sigma 0).

  Args:
    example: {'image': [H, W, 3], 'label': [H, W]}.
    seed: [2] int stateless seed.
    p: probability of blurring.

  Returns:
    The example with a float32 image.
  """
  image = as_float(example['image'])
  image = tf.cond(coin(seed, p), lambda: gaussian_blur(image), lambda: image)
  return {**example, 'image': image}


def random_horizontal_flip(example: Example, seed: tf.Tensor, p: float = 0.5) -> Example:
  """With probability p mirrors image and label left-right (RandomHorizontalFlip).

  Args:
    example: {'image': [H, W, 3], 'label': [H, W]}.
    seed: [2] int stateless seed.
    p: probability of flipping.

  Returns:
    The example, dtypes unchanged.
  """
  image, label = geometry.flip_if(coin(seed, p), example['image'], example['label'])
  return {**example, 'image': image, 'label': label}


def _pad(example: Example, top, bottom, left, right, ignore_label: int) -> Example:
  """Pads the image with the exact mean colour and the label with ignore_label."""
  paddings = [[top, bottom], [left, right]]
  image = tf.pad(as_float(example['image']), paddings + [[0, 0]])
  inside = tf.pad(tf.ones_like(example['label'], tf.bool)[..., None], paddings + [[0, 0]])
  image = tf.where(inside, image, tf.constant(MEAN_RGB, tf.float32))
  label = tf.pad(example['label'], paddings, constant_values=ignore_label)
  return {**example, 'image': image, 'label': label}


def _pad_centred(example: Example, height: int, width: int, ignore_label: int) -> Example:
  """Pads to at least (height, width) as semseg's Crop: int(pad / 2) before, the rest after."""
  shape = tf.shape(example['label'])
  top, bottom = geometry.centred_padding(shape[0], height)
  left, right = geometry.centred_padding(shape[1], width)
  return _pad(example, top, bottom, left, right, ignore_label)


def crop_offsets(seed: tf.Tensor, padded_shape: tf.Tensor, crop_size: Sequence[int]):
  """Crop's random window position in an image already padded to at least crop_size.

  Args:
    seed: [2] int stateless seed.
    padded_shape: int32 [2], (H, W) of the padded image.
    crop_size: (crop_h, crop_w).

  Returns:
    [top, left] int32 scalars, uniform in [0, H - crop_h] and [0, W - crop_w].
  """
  # Why: random.randint(0, h - crop_h) includes both ends.
  seeds = split_seed(seed, 2)
  return [
    tf.random.stateless_uniform([], s, 0, size - crop + 1, dtype=tf.int32)
    for s, size, crop in zip(seeds, tf.unstack(padded_shape), crop_size, strict=True)
  ]


def random_crop(
  example: Example, seed: tf.Tensor, crop_size: Sequence[int], ignore_label: int = 255
) -> Example:
  """Pads (centred, mean / ignore_label) to at least crop_size, then crops at random (Crop 'rand').

  Args:
    example: {'image': [H, W, 3], 'label': [H, W]}.
    seed: [2] int stateless seed.
    crop_size: (height, width) of the output (train_h / train_w).
    ignore_label: label fill value.

  Returns:
    {'image': float32 [crop_h, crop_w, 3], 'label': [crop_h, crop_w]}.
  """
  crop_h, crop_w = crop_size
  example = _pad_centred(example, crop_h, crop_w, ignore_label)
  top, left = crop_offsets(seed, tf.shape(example['label']), crop_size)
  image = tf.slice(example['image'], [top, left, 0], [crop_h, crop_w, 3])
  label = tf.slice(example['label'], [top, left], [crop_h, crop_w])
  return {**example, 'image': image, 'label': label}


def normalize(image: tf.Tensor) -> tf.Tensor:
  """(image - mean) / std per RGB channel on the 0..255 scale (Normalize); float32 [..., 3]."""
  return per_channel(image, lambda x, m, s: (as_float(x) - m) / s, MEAN_RGB, STD_RGB)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """A normalised image back on the 0..255 scale, rounded to the nearest integer, as uint8.

  normalize's inverse, for config.data.transfer_dtype 'uint8': an integer-valued image (a
  decoded file, mmseg's uint8 chain) comes back exactly; a resized or blurred one within 0.5
  of its values; mean padding becomes the rounded mean colour.
  """
  image = per_channel(image, lambda x, m, s: x * s + m, MEAN_RGB, STD_RGB)
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def resize_long_side(image: tf.Tensor, long_size: tf.Tensor) -> tf.Tensor:
  """Bilinear resize so the long side is long_size (tool/test.py, cv2.resize with dsize).

  Args:
    image: [H, W, C] uint8 or float.
    long_size: int scalar.

  Returns:
    float32 [new_h, new_w, C] with the size from geometry.long_side_size.
  """
  shape = tf.shape(image)
  new_h, new_w = geometry.long_side_size(shape[0], shape[1], long_size)
  return geometry.resize_bilinear(as_float(image), tf.stack([new_h, new_w]))


def pad_to_size(
  example: Example, height: int, width: int, ignore_label: int = 255, centred: bool = False
) -> Example:
  """Pads image (mean colour) and label (ignore_label) to exactly (height, width).

  Args:
    example: {'image': [H, W, 3], 'label': [H, W]} with H <= height and W <= width.
    height: output height.
    width: output width.
    ignore_label: label fill value.
    centred: split the padding like tool/test.py's scale_process (int(pad / 2) before);
      False puts it all at the bottom / right, so the content stays at [:H, :W].

  Returns:
    {'image': float32 [height, width, 3], 'label': [height, width]}.
  """
  shape = tf.shape(example['label'])
  check = tf.debugging.assert_less_equal(
    shape,
    tf.constant([height, width]),
    message=(
      f'pad_to_size: an example is larger than the pad size ({height}, {width}); '
      'pass a larger pad_to (or None to pad each batch to its largest example)'
    ),
  )
  with tf.control_dependencies([check]):
    pad_h, pad_w = height - shape[0], width - shape[1]
  top = pad_h // 2 if centred else 0
  left = pad_w // 2 if centred else 0
  out = _pad(example, top, pad_h - top, left, pad_w - left, ignore_label)
  out['image'] = tf.ensure_shape(out['image'], [height, width, 3])
  out['label'] = tf.ensure_shape(out['label'], [height, width])
  return out
