"""The official training augmentation chain (tool/train.py's train_transform) on one example.

`train_augment` draws the same random numbers as the op-by-op chain of `transforms` and gives
the same result, but rotates and blurs only the crop window.
Design: docs/design.md#training-augmentation
"""

from collections.abc import Sequence

import tensorflow as tf

from psp_jax.data import geometry, transforms
from psp_jax.data.normalization import STD_RGB

ROTATE_P = 0.5  # RandRotate(p=0.5)
BLUR_P = 0.5  # RandomGaussianBlur: `if random.random() < 0.5`
FLIP_P = 0.5  # RandomHorizontalFlip(p=0.5)


def train_augment(
  example: transforms.Example,
  seed: tf.Tensor,
  *,
  crop_size: Sequence[int],
  scale_range: Sequence[float] | None = (0.5, 2.0),
  rotate_range: Sequence[float] | None = (-10.0, 10.0),
  blur: bool = True,
  flip: bool = True,
  ignore_label: int = 255,
  aspect_ratio_range: Sequence[float] | None = None,
) -> transforms.Example:
  """The official training augmentation of one example, computing only the crop window.

  Args:
    example: {'image': uint8 [H, W, 3] RGB, 'label': uint8 [H, W]}.
    seed: [2] int stateless seed; each op gets its own seed split from it.
    crop_size: (height, width) of the output (train_h, train_w).
    scale_range: RandScale (scale_min, scale_max), or None to skip.
    rotate_range: RandRotate (rotate_min, rotate_max), applied with p 0.5, or None to skip.
    blur: RandomGaussianBlur (5x5, sigma 0, p 0.5).
    flip: RandomHorizontalFlip (p 0.5).
    ignore_label: label fill value for rotation and padding.
    aspect_ratio_range: RandScale's aspect_ratio (None = off, the official setting).

  Returns:
    {'image': float32 [crop_h, crop_w, 3] normalised, 'label': int32 [crop_h, crop_w]},
    equal to the op-by-op chain up to float32 rounding (image within ~1e-4).
  """
  crop_h, crop_w = crop_size
  seeds = transforms.split_seed(seed, 5)
  # Every step below is linear with weights summing to 1, or pads with the mean colour, so it
  # commutes with subtracting the mean: work on image - mean, pad with 0, divide by std last.
  out = {'image': transforms.centre(example['image']), 'label': example['label']}
  if scale_range is not None:
    out = transforms.random_scale(out, seeds[0], scale_range, aspect_ratio_range)
  image, label = out['image'], out['label']
  shape = tf.shape(label)
  height, width = shape[0], shape[1]

  no = tf.constant(False)
  do_rotate, angle = no, tf.constant(0.0, tf.float64)
  if rotate_range is not None:
    do_rotate, angle = transforms.rotate_draw(seeds[1], rotate_range, ROTATE_P)
  do_blur = transforms.coin(seeds[2], BLUR_P) if blur else no
  do_flip = transforms.coin(seeds[3], FLIP_P) if flip else no
  pad_top, pad_bottom = geometry.centred_padding(height, crop_h)
  pad_left, pad_right = geometry.centred_padding(width, crop_w)
  padded_shape = tf.stack([height + pad_top + pad_bottom, width + pad_left + pad_right])
  top, left = transforms.crop_offsets(seeds[4], padded_shape, crop_size)

  # The crop window in the coordinates of the rotated image, before blur, flip and padding.
  # A window at column c of the flipped image covers columns [W - c - crop_w, W - c) unflipped.
  win_top = top - pad_top
  win_left = left - pad_left
  win_left = tf.where(do_flip, width - win_left - crop_w, win_left)
  # Its part inside the image, [r0, r1) x [c0, c1]; the rest is Crop's mean / 255 padding.
  r0, r1 = tf.maximum(win_top, 0), tf.minimum(win_top + crop_h, height)
  c0, c1 = tf.maximum(win_left, 0), tf.minimum(win_left + crop_w, width)
  # The blur reads `margin` more pixels on each side, where the image has them.
  margin = transforms.BLUR_SIZE // 2 if blur else 0
  rr0, rr1 = tf.maximum(r0 - margin, 0), tf.minimum(r1 + margin, height)
  cc0, cc1 = tf.maximum(c0 - margin, 0), tf.minimum(c1 + margin, width)
  region_size = tf.stack([rr1 - rr0, cc1 - cc0])
  window_size = tf.stack([r1 - r0, c1 - c0])

  def rotated():
    image_t = geometry.rotation_transform(shape, angle, rr0, cc0)
    label_t = geometry.rotation_transform(shape, angle, r0, c0)
    return (
      geometry.warp(image, image_t, region_size, 'BILINEAR', 0.0),
      geometry.warp_label(label, label_t, window_size, ignore_label),
    )

  def unrotated():
    return image[rr0:rr1, cc0:cc1], label[r0:r1, c0:c1]

  region, label = tf.cond(do_rotate, rotated, unrotated)

  def blurred():
    # Reflect (BORDER_REFLECT_101) only where the margin runs off the image: the region then
    # starts at the image border, so reflecting the region is reflecting the image.
    paddings = [
      [tf.maximum(margin - r0, 0), tf.maximum(r1 + margin - height, 0)],
      [tf.maximum(margin - c0, 0), tf.maximum(c1 + margin - width, 0)],
      [0, 0],
    ]
    return transforms.blur_padded(tf.pad(region, paddings, mode='REFLECT'), transforms.BLUR_SIZE)

  def sharp():
    return tf.slice(region, [r0 - rr0, c0 - cc0, 0], [r1 - r0, c1 - c0, -1])

  image = tf.cond(do_blur, blurred, sharp) if blur else sharp()

  paddings = [[r0 - win_top, win_top + crop_h - r1], [c0 - win_left, win_left + crop_w - c1]]
  image = tf.pad(transforms.per_channel(image, tf.divide, STD_RGB), paddings + [[0, 0]])
  label = tf.pad(label, paddings, constant_values=ignore_label)
  image, label = geometry.flip_if(do_flip, image, label)
  return {
    'image': tf.ensure_shape(image, [crop_h, crop_w, 3]),
    'label': tf.ensure_shape(tf.cast(label, tf.int32), [crop_h, crop_w]),
  }
