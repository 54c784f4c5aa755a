"""The training augmentation op by op, the reference that augment.train_augment must equal."""

from collections.abc import Sequence

import tensorflow as tf

from psp_jax.data import augment, transforms


def augment_reference(
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
  """The chain op by op: RandScale, RandRotate, RandomGaussianBlur, flip, Crop, Normalize.

  Args: as augment.train_augment.

  Returns:
    {'image': float32 [crop_h, crop_w, 3] normalised, 'label': int32 [crop_h, crop_w]}.
  """
  # The same five seeds, in the same order, as train_augment splits.
  seeds = transforms.split_seed(seed, 5)
  out = {'image': transforms.as_float(example['image']), 'label': example['label']}
  if scale_range is not None:
    out = transforms.random_scale(out, seeds[0], scale_range, aspect_ratio_range)
  if rotate_range is not None:
    out = transforms.random_rotate(out, seeds[1], rotate_range, augment.ROTATE_P, ignore_label)
  if blur:
    out = transforms.random_gaussian_blur(out, seeds[2], augment.BLUR_P)
  if flip:
    out = transforms.random_horizontal_flip(out, seeds[3], augment.FLIP_P)
  out = transforms.random_crop(out, seeds[4], crop_size, ignore_label)
  return {'image': transforms.normalize(out['image']), 'label': tf.cast(out['label'], tf.int32)}
