"""Tests of psp_jax.data transforms, geometry and augment against NumPy transcriptions of cv2."""

import math

import numpy as np
import pytest
import tensorflow as tf

from psp_jax.data import augment, geometry, normalization, transforms

from augment_reference import augment_reference  # noqa: I001 (tests/ is on sys.path)

MEAN = np.array(normalization.MEAN_RGB, np.float32)
STD = np.array(normalization.STD_RGB, np.float32)


# ----------------------------------------------------------------------------------------------
# NumPy transcriptions of the cv2 calls in hszhao/semseg util/transform.py.


def np_resize_bilinear(image, out_h, out_w):
  """cv2.resize(INTER_LINEAR) with dsize: half-pixel centres, edge replicated."""

  def axis(out, size):
    src = (np.arange(out) + 0.5) * (size / out) - 0.5
    lo = np.floor(src).astype(int)
    frac = src - lo
    frac[(lo < 0) | (lo >= size - 1)] = 0
    lo = np.clip(lo, 0, size - 1)
    return lo, np.minimum(lo + 1, size - 1), frac

  r0, r1, fr = axis(out_h, image.shape[0])
  c0, c1, fc = axis(out_w, image.shape[1])
  rows = image[r0] * (1 - fr)[:, None, None] + image[r1] * fr[:, None, None]
  return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]


def np_resize_nearest(label, out_h, out_w):
  """cv2.resize(INTER_NEAREST): src = floor(dst / (out / in)), no half-pixel offset."""
  h, w = label.shape
  rows = np.minimum(np.floor(np.arange(out_h) * (1 / (out_h / h))).astype(int), h - 1)
  cols = np.minimum(np.floor(np.arange(out_w) * (1 / (out_w / w))).astype(int), w - 1)
  return label[rows][:, cols]


def np_rotation_matrix(cx, cy, angle):
  """cv2.getRotationMatrix2D((cx, cy), angle, 1): maps source to destination."""
  a, b = math.cos(math.radians(angle)), math.sin(math.radians(angle))
  return np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]])


def np_warp_affine(src, matrix, fill, nearest):
  """cv2.warpAffine(src, M, (w, h), BORDER_CONSTANT): samples src at M^-1 (x, y)."""
  h, w = src.shape[:2]
  inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
  sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
  sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
  fill = np.asarray(fill, np.float64)

  def read(iy, ix):
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    values = src[np.clip(iy, 0, h - 1), np.clip(ix, 0, w - 1)].astype(np.float64)
    mask = inside if src.ndim == 2 else inside[..., None]
    return np.where(mask, values, fill)

  if nearest:
    return read(np.floor(sy + 0.5).astype(int), np.floor(sx + 0.5).astype(int))
  x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
  fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]
  top = read(y0, x0) * (1 - fx) + read(y0, x0 + 1) * fx
  bottom = read(y0 + 1, x0) * (1 - fx) + read(y0 + 1, x0 + 1) * fx
  return top * (1 - fy) + bottom * fy


def np_blur(image, taps):
  """cv2.GaussianBlur with BORDER_REFLECT_101 (numpy's 'reflect')."""
  r = len(taps) // 2
  padded = np.pad(image.astype(np.float64), [(r, r), (r, r), (0, 0)], mode='reflect')
  h, w = image.shape[:2]
  out = np.zeros(image.shape, np.float64)
  for i, ti in enumerate(taps):
    for j, tj in enumerate(taps):
      out += ti * tj * padded[i : i + h, j : j + w]
  return out


# ----------------------------------------------------------------------------------------------
# Test data: images whose colours encode the coarse grid cell that the label names.


def coord_example(h, w, cell):
  """R, G = 10 * (grid row, grid column), B = 200; label = grid cell id."""
  rows, cols = np.mgrid[0:h, 0:w] // cell
  ncols = -(-w // cell)
  image = np.stack([10 * rows, 10 * cols, np.full_like(rows, 200)], -1).astype(np.uint8)
  label = (rows * ncols + cols).astype(np.uint8)
  return {'image': tf.constant(image), 'label': tf.constant(label)}, ncols


def assert_aligned(image, label, ncols, reach=0, min_pure=0.2):
  """Where the image shows one pure cell colour, the label names that cell.

  reach > 0 accepts the cell within `reach` pixels (cv2 INTER_NEAREST's half-pixel shift).
  """
  image = np.asarray(image, np.float64)
  label = np.asarray(label)
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  pure = (np.abs(b - 200) < 1e-3) & (np.abs(r - 10 * np.round(r / 10)) < 1e-3)
  pure &= np.abs(g - 10 * np.round(g / 10)) < 1e-3
  assert pure.mean() > min_pure, f'only {pure.mean():.2f} of the pixels show one cell'
  expected = np.round(r / 10) * ncols + np.round(g / 10)
  if reach == 0:
    np.testing.assert_array_equal(label[pure], expected[pure])
    return
  padded = np.pad(label.astype(np.int64), reach, constant_values=-1)
  h, w = label.shape
  near = np.zeros_like(pure)
  for dy in range(2 * reach + 1):
    for dx in range(2 * reach + 1):
      near |= padded[dy : dy + h, dx : dx + w] == expected
  assert near[pure].all()
  assert (label[pure] == expected[pure]).mean() > 0.8


def seeds(n, start=0):
  return [tf.constant([start + i, 17], tf.int64) for i in range(n)]


def chain(example, seed, **kwargs):
  kwargs = {'crop_size': (33, 41), **kwargs}
  return augment.train_augment(example, seed, **kwargs)


# ----------------------------------------------------------------------------------------------


def test_gaussian_kernel_is_opencv_small_table():
  np.testing.assert_array_equal(transforms.gaussian_kernel_1d(5), np.array([1, 4, 6, 4, 1]) / 16)
  np.testing.assert_array_equal(transforms.gaussian_kernel_1d(3), [0.25, 0.5, 0.25])
  # Beyond 7 taps OpenCV derives sigma from the size.
  sigma = 0.3 * ((9 - 1) * 0.5 - 1) + 0.8
  x = np.arange(9) - 4.0
  expected = np.exp(-(x**2) / (2 * sigma**2))
  np.testing.assert_allclose(
    transforms.gaussian_kernel_1d(9), expected / expected.sum(), rtol=1e-12
  )
  with pytest.raises(ValueError, match='odd'):
    transforms.gaussian_kernel_1d(4)


def test_gaussian_blur_matches_numpy():
  image = np.random.default_rng(0).uniform(0, 255, (17, 23, 3)).astype(np.float32)
  out = transforms.gaussian_blur(tf.constant(image)).numpy()
  np.testing.assert_allclose(out, np_blur(image, transforms.gaussian_kernel_1d(5)), atol=2e-4)
  flat = np.full((9, 9, 3), 77.0, np.float32)
  np.testing.assert_allclose(transforms.gaussian_blur(tf.constant(flat)).numpy(), flat, atol=1e-5)


def test_flip_is_exact_and_follows_its_coin():
  example, _ = coord_example(40, 53, 8)
  flipped = 0
  for seed in seeds(12):
    out = transforms.random_horizontal_flip(example, seed)
    image, label = example['image'].numpy(), example['label'].numpy()
    if not np.array_equal(out['label'].numpy(), label):
      image, label = image[:, ::-1], label[:, ::-1]
      flipped += 1
    np.testing.assert_array_equal(out['image'].numpy(), image)
    np.testing.assert_array_equal(out['label'].numpy(), label)
  assert 0 < flipped < 12
  always = transforms.random_horizontal_flip(example, seeds(1)[0], p=1.0)
  np.testing.assert_array_equal(always['label'].numpy(), example['label'].numpy()[:, ::-1])


def test_crop_is_exact_and_offsets_cover_both_ends():
  example, _ = coord_example(40, 50, 8)
  image = example['image'].numpy().astype(np.float32)
  label = example['label'].numpy()
  offsets = set()
  for seed in seeds(150):
    out = transforms.random_crop(example, seed, (33, 41))
    top, left = (int(v) for v in transforms.crop_offsets(seed, tf.constant([40, 50]), (33, 41)))
    np.testing.assert_array_equal(out['image'].numpy(), image[top : top + 33, left : left + 41])
    np.testing.assert_array_equal(out['label'].numpy(), label[top : top + 33, left : left + 41])
    offsets.add((top, left))
  tops, lefts = {t for t, _ in offsets}, {l for _, l in offsets}  # noqa: E741
  assert tops == set(range(8)) and lefts == set(range(10))  # randint includes both ends


def test_crop_pads_centred_with_mean_and_ignore():
  example, _ = coord_example(20, 30, 8)
  out = transforms.random_crop(example, seeds(1)[0], (33, 41), ignore_label=250)
  image, label = out['image'].numpy(), out['label'].numpy()
  # pad_h = 13: int(13 / 2) = 6 rows on top, 7 below; pad_w = 11: 5 left, 6 right.
  np.testing.assert_array_equal(image[6:26, 5:35], example['image'].numpy())
  np.testing.assert_array_equal(label[6:26, 5:35], example['label'].numpy())
  inside = np.zeros((33, 41), bool)
  inside[6:26, 5:35] = True
  np.testing.assert_array_equal(image[~inside], np.broadcast_to(MEAN, image[~inside].shape))
  assert (label[~inside] == 250).all()
  assert (transforms.normalize(image).numpy()[~inside] == 0).all()  # mean padding normalises to 0


@pytest.mark.parametrize(('factor', 'size'), [(1.37, (88, 68)), (1.25, (80, 62)), (0.5, (32, 25))])
def test_rescale_size_and_values_match_cv2(factor, size):
  rng = np.random.default_rng(1)
  image = rng.uniform(0, 255, (64, 50, 3)).astype(np.float32)
  label = rng.integers(0, 9, (64, 50)).astype(np.uint8)
  out = transforms.rescale(
    {'image': tf.constant(image), 'label': tf.constant(label)}, factor, factor
  )
  # cv2's dsize = cvRound(size * fx) in double, half to even: 50 * 1.25 = 62.5 -> 62.
  assert size == (round(64 * factor), round(50 * factor))
  assert out['label'].shape == size and out['image'].dtype == tf.float32
  np.testing.assert_allclose(out['image'].numpy(), np_resize_bilinear(image, *size), atol=2e-3)
  np.testing.assert_array_equal(out['label'].numpy(), np_resize_nearest(label, *size))


@pytest.mark.parametrize('angle', [7.3, -9.6])
def test_rotate_matches_cv2_warp_affine(angle):
  rng = np.random.default_rng(2)
  image = rng.uniform(0, 255, (37, 53, 3)).astype(np.float32)
  label = rng.integers(0, 9, (37, 53)).astype(np.uint8)
  out = transforms.rotate({'image': tf.constant(image), 'label': tf.constant(label)}, angle, 250)
  matrix = np_rotation_matrix(53 / 2, 37 / 2, angle)
  np.testing.assert_allclose(
    out['image'].numpy(), np_warp_affine(image, matrix, MEAN, nearest=False), atol=5e-3
  )
  expected = np_warp_affine(label, matrix, 250, nearest=True)
  np.testing.assert_array_equal(out['label'].numpy(), expected)
  assert out['label'].numpy()[0, 0] == 250  # corners come from outside the image
  np.testing.assert_allclose(out['image'].numpy()[0, 0], MEAN, atol=1e-4)


def test_ops_keep_image_and_label_aligned():
  example, ncols = coord_example(97, 129, 16)
  assert_aligned(example['image'], example['label'], ncols)
  for seed in seeds(4):
    for op in (
      lambda e, s: transforms.random_rotate(e, s, p=1.0),
      transforms.random_horizontal_flip,
      lambda e, s: transforms.random_crop(e, s, (65, 65)),
      lambda e, s: transforms.random_crop(e, s, (113, 65)),  # padded on top and bottom
      lambda e, s: transforms.random_gaussian_blur(e, s, p=1.0),
    ):
      out = op(example, seed)
      assert_aligned(out['image'], out['label'], ncols)
    out = transforms.random_scale(example, seed)  # cv2 INTER_NEAREST is shifted by up to one pixel
    assert_aligned(out['image'], out['label'], ncols, reach=1)
    out = chain(example, seed, crop_size=(65, 65))
    image = out['image'].numpy() * STD + MEAN
    assert_aligned(image, out['label'], ncols, reach=1, min_pure=0.1)


def test_labels_only_take_input_values_or_ignore():
  rng = np.random.default_rng(3)
  values = np.array([3, 7, 42, 100], np.uint8)
  label = values[rng.integers(0, 4, (8, 8)).repeat(8, 0).repeat(8, 1)][:61, :]
  image = rng.integers(0, 255, (61, 64, 3), np.uint8)
  example = {'image': tf.constant(image), 'label': tf.constant(label)}
  allowed = set(values.tolist()) | {255}
  for seed in seeds(6):
    for op in (
      transforms.random_scale,
      lambda e, s: transforms.random_rotate(e, s, p=1.0),
      transforms.random_horizontal_flip,
      lambda e, s: transforms.random_crop(e, s, (65, 33)),
      chain,
      lambda e, s: augment_reference(e, s, crop_size=(33, 41)),
    ):
      out = op(example, seed)
      assert set(np.unique(out['label'].numpy()).tolist()) <= allowed


def test_chain_pads_with_zero_image_and_ignore_label():
  example, _ = coord_example(24, 30, 8)
  out = chain(example, seeds(1)[0], scale_range=None, rotate_range=(5.0, 6.0), crop_size=(49, 57))
  image, label = out['image'].numpy(), out['label'].numpy()
  # A 24 x 30 image in a 49 x 57 crop: rows 0..11 and 36.. are Crop padding whatever happened.
  assert (image[:12] == 0).all() and (image[36:] == 0).all()
  assert (label[:12] == 255).all() and (label[36:] == 255).all()
  assert out['label'].dtype == tf.int32 and out['image'].dtype == tf.float32


RANDOM_OPS = {
  'scale': transforms.random_scale,
  'rotate': transforms.random_rotate,
  'blur': transforms.random_gaussian_blur,
  'flip': transforms.random_horizontal_flip,
  'crop': lambda e, s: transforms.random_crop(e, s, (33, 41)),
  'chain': chain,
}


@pytest.mark.parametrize('name', sorted(RANDOM_OPS))
def test_op_gives_the_same_result_eagerly_and_in_tf_data(name):
  op = RANDOM_OPS[name]
  example, _ = coord_example(45, 64, 8)
  seed_list = seeds(4, start=5)
  dataset = tf.data.Dataset.from_tensor_slices(tf.stack(seed_list)).map(lambda s: op(example, s))
  for seed, graph in zip(seed_list, dataset, strict=True):
    eager = op(example, seed)
    np.testing.assert_allclose(graph['image'].numpy(), eager['image'].numpy(), atol=1e-4)
    np.testing.assert_array_equal(graph['label'].numpy(), eager['label'].numpy())


def test_same_seed_same_result_other_seed_differs():
  example, _ = coord_example(45, 64, 8)
  a, b, c = (chain(example, tf.constant(s, tf.int64)) for s in ([1, 2], [1, 2], [1, 3]))
  np.testing.assert_array_equal(a['image'].numpy(), b['image'].numpy())
  np.testing.assert_array_equal(a['label'].numpy(), b['label'].numpy())
  assert not np.array_equal(a['image'].numpy(), c['image'].numpy())


@pytest.mark.parametrize(
  ('h', 'w', 'blur', 'flip'),
  [(64, 80, True, True), (20, 90, True, True), (129, 31, True, False), (50, 60, False, True)],
)
def test_fused_chain_equals_op_by_op_chain(h, w, blur, flip):
  rng = np.random.default_rng(h * w)
  example = {
    'image': tf.constant(rng.integers(0, 256, (h, w, 3), np.uint8)),
    'label': tf.constant(rng.integers(0, 20, (h, w), np.uint8)),
  }
  kwargs = dict(crop_size=(33, 41), blur=blur, flip=flip)
  for seed in seeds(12, start=h):
    fused = augment.train_augment(example, seed, **kwargs)
    reference = augment_reference(example, seed, **kwargs)
    # Only the rotation's float32 coordinates are computed from another origin.
    np.testing.assert_allclose(fused['image'].numpy(), reference['image'].numpy(), atol=1e-3)
    mismatch = fused['label'].numpy() != reference['label'].numpy()
    assert mismatch.mean() <= 1e-3


@pytest.mark.parametrize(
  ('h', 'w', 'long_size'), [(375, 500, 512), (500, 375, 512), (300, 300, 384), (5, 512, 256)]
)
def test_long_side_size_is_tool_test_formula(h, w, long_size):
  if h > w:
    expected = (long_size, round(long_size / float(h) * w))
  else:
    expected = (round(long_size / float(w) * h), long_size)
  got = tuple(int(v) for v in geometry.long_side_size(h, w, long_size))
  assert got == expected
  if (h, w) == (5, 512):
    assert got == (2, 256)  # round(2.5) = 2: half to even, like Python


def test_resize_long_side_matches_cv2():
  image = np.random.default_rng(4).uniform(0, 255, (30, 45, 3)).astype(np.float32)
  out = transforms.resize_long_side(tf.constant(image), 64).numpy()
  assert out.shape == (43, 64, 3)  # round(64 / 45 * 30) = round(42.67)
  np.testing.assert_allclose(out, np_resize_bilinear(image, 43, 64), atol=2e-3)


def test_pad_to_size_bottom_right_and_centred():
  example, _ = coord_example(20, 30, 8)
  image = example['image'].numpy()
  out = transforms.pad_to_size(example, 25, 33)
  np.testing.assert_array_equal(out['image'].numpy()[:20, :30], image)
  np.testing.assert_array_equal(out['image'].numpy()[20:, :], np.broadcast_to(MEAN, (5, 33, 3)))
  assert (out['label'].numpy()[:, 30:] == 255).all()
  centred = transforms.pad_to_size(example, 25, 33, centred=True)
  np.testing.assert_array_equal(centred['image'].numpy()[2:22, 1:31], image)  # int(5/2), int(3/2)
  np.testing.assert_array_equal(centred['label'].numpy()[2:22, 1:31], example['label'].numpy())
  with pytest.raises(tf.errors.InvalidArgumentError, match='larger than the pad size'):
    transforms.pad_to_size(example, 19, 33)


def test_normalize_is_imagenet_on_0_255():
  out = transforms.normalize(tf.constant([[[255.0, 0.0, 127.5]]])).numpy()[0, 0]
  expected = (np.array([255.0, 0.0, 127.5]) - np.array([0.485, 0.456, 0.406]) * 255) / (
    np.array([0.229, 0.224, 0.225]) * 255
  )
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  assert (transforms.normalize(tf.constant(MEAN)).numpy() == 0).all()
