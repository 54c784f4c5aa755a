"""Where the pixels go: resizing, the rotation warp, the flip and the padding maths, on tensors.

The building blocks that `transforms` composes into whole-image ops on example dicts and that
`augment.train_augment` applies to the crop window only; each mirrors one cv2 call or size
formula of hszhao/semseg (util/transform.py, tool/test.py). Images are [H, W, C], labels [H, W].
"""

import numpy as np
import tensorflow as tf


def resize_bilinear(image: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """Bilinear resize with half-pixel centres and no antialias, as cv2.resize(INTER_LINEAR).

  Args:
    image: float32 [H, W, C].
    size: int32 [2], the output (h, w).

  Returns:
    float32 [h, w, C].
  """
  # Why: cv2.resize(INTER_LINEAR) samples src = (dst + 0.5) * in / out - 0.5 and replicates the
  # edge pixel outside; ResizeBilinear(half_pixel_centers=True) computes the same.
  return tf.raw_ops.ResizeBilinear(images=image[None], size=size, half_pixel_centers=True)[0]


def resize_nearest(label: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """Nearest-neighbour resize, as cv2.resize(INTER_NEAREST).

  Args:
    label: [H, W], any dtype.
    size: int32 [2], the output (h, w).

  Returns:
    [h, w], label's dtype.
  """
  shape = tf.shape(label)
  rows = tf.gather(label, nearest_indices(size[0], shape[0]))
  return tf.gather(rows, nearest_indices(size[1], shape[1]), axis=1)


def nearest_indices(out_size: tf.Tensor, in_size: tf.Tensor) -> tf.Tensor:
  """Source index of each output row (or column) of resize_nearest along one axis.

  Args:
    out_size: int32 scalar, the output length.
    in_size: int32 scalar, the input length.

  Returns:
    int32 [out_size].
  """
  # Why: cv2's resizeNN takes src = floor(dst / (out / in)) in double precision, with no
  # half-pixel offset (so it is shifted against the bilinear image), clamped to the last row.
  inverse = 1.0 / (tf.cast(out_size, tf.float64) / tf.cast(in_size, tf.float64))
  src = tf.floor(tf.cast(tf.range(out_size), tf.float64) * inverse)
  return tf.minimum(tf.cast(src, tf.int32), in_size - 1)


def long_side_size(height: tf.Tensor, width: tf.Tensor, long_size: tf.Tensor):
  """The (new_h, new_w) of tool/test.py: the long side becomes long_size, aspect kept.

  Args:
    height: int scalar.
    width: int scalar.
    long_size: int scalar, round(scale * base_size) in the original.

  Returns:
    (new_h, new_w) int32 scalars; the short side is round(long_size / long * short), rounded
    half to even like Python's round() and at least 1; a square image counts as wide (`if h > w`
    is strict).
  """
  h = tf.cast(height, tf.float64)
  w = tf.cast(width, tf.float64)
  long = tf.cast(long_size, tf.float64)
  new_h = tf.where(h > w, long, tf.maximum(tf.round(long / w * h), 1.0))
  new_w = tf.where(h > w, tf.maximum(tf.round(long / h * w), 1.0), long)
  return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


def rotation_transform(shape: tf.Tensor, angle: tf.Tensor, top=0, left=0) -> tf.Tensor:
  """The ImageProjectiveTransform of RandRotate, for an output window at (top, left).

  Args:
    shape: int [2], (H, W) of the image being rotated (the centre is (W / 2, H / 2)).
    angle: float scalar, degrees counter-clockwise.
    top: int scalar, first row of the output window in the full rotated image.
    left: int scalar, first column of that window.

  Returns:
    float32 [1, 8], the transform for warp.
  """
  height = tf.cast(shape[0], tf.float32)
  width = tf.cast(shape[1], tf.float32)
  # Why: cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1) then cv2.warpAffine, which samples
  # the source at M^-1 (x, y) for each output pixel; M^-1 is the rotation by -angle about the
  # same centre. Pixel centres sit at integer coordinates in both cv2 and TF.
  theta = tf.cast(angle, tf.float32) * (np.pi / 180.0)
  a, b = tf.cos(theta), tf.sin(theta)
  cx, cy = width / 2.0, height / 2.0
  top = tf.cast(top, tf.float32)
  left = tf.cast(left, tf.float32)
  # Output pixel (x, y) of the window is (x + left, y + top) of the full output.
  tx = (1 - a) * cx + b * cy + a * left - b * top
  ty = -b * cx + (1 - a) * cy + b * left + a * top
  zero = tf.zeros([], tf.float32)
  return tf.stack([a, -b, tx, b, a, ty, zero, zero])[None]


def warp(image: tf.Tensor, transform: tf.Tensor, size, interpolation: str, fill) -> tf.Tensor:
  """Samples one image through a projective transform, with a constant fill outside.

  Args:
    image: [H, W, C], float32 or uint8.
    transform: float32 [1, 8], e.g. from rotation_transform.
    size: int32 [2], the output (h, w).
    interpolation: 'BILINEAR' or 'NEAREST'.
    fill: float scalar, the value of pixels sampled from outside the image.

  Returns:
    [h, w, C], image's dtype.
  """
  return tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None], transforms=transform, output_shape=size, fill_value=fill,
    interpolation=interpolation, fill_mode='CONSTANT')[0]  # fmt: skip


def warp_label(label: tf.Tensor, transform: tf.Tensor, size, ignore_label: int) -> tf.Tensor:
  """warp of a label map: nearest, ignore_label outside.

  Args:
    label: [H, W] uint8.
    transform: float32 [1, 8].
    size: int32 [2], the output (h, w).
    ignore_label: label of the pixels sampled from outside.

  Returns:
    uint8 [h, w].
  """
  return warp(label[..., None], transform, size, 'NEAREST', float(ignore_label))[..., 0]


def flip_if(flip: tf.Tensor, image: tf.Tensor, label: tf.Tensor):
  """(image, label) mirrored left-right if flip, else unchanged.

  Args:
    flip: bool scalar.
    image: [H, W, C].
    label: [H, W].

  Returns:
    (image, label), shapes and dtypes unchanged.
  """
  return tf.cond(
    flip, lambda: (tf.reverse(image, [1]), tf.reverse(label, [1])), lambda: (image, label)
  )


def centred_padding(size: tf.Tensor, target: int):
  """(before, after) padding of one axis up to target, as semseg's Crop.__call__ splits it.

  Args:
    size: int32 scalar, the axis length.
    target: the length to pad to; a longer axis gets no padding.

  Returns:
    (before, after) int32 scalars: int(pad / 2) before, the rest after.
  """
  pad = tf.maximum(target - size, 0)
  return pad // 2, pad - pad // 2
