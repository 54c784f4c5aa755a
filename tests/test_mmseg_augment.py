"""psp_jax.data.mmseg_augment against OpenCV's and mmseg's own outputs and NumPy restatements.

tests/data/mmseg_reference.npz holds what OpenCV 4.10 and mmsegmentation 1.2.2 computed
(tests/data/make_mmseg_reference.py); the NumPy functions here restate mmcv's and mmseg's
rules from their source, independently of the TF code.
"""

import pathlib

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from psp_jax.data import mmseg_augment, pipeline, transforms
from psp_jax.data.normalization import MEAN_RGB, STD_RGB
from psp_jax.inference import planning

from helpers import assert_same_batches, data_config, source, take

REFERENCE = np.load(pathlib.Path(__file__).parent / 'data' / 'mmseg_reference.npz')
MEAN, STD = np.array(MEAN_RGB), np.array(STD_RGB)
CROP, SCALE = (33, 41), (128, 32)  # what make_mmseg_reference.py ran mmseg with


def seeds(n, start=0):
  return [tf.constant([start + i, 3], tf.int64) for i in range(n)]


def random_example(h, w, seed, classes=4):
  rng = np.random.default_rng(seed)
  label = rng.integers(0, classes, (h // 5 + 1, w // 5 + 1)).repeat(5, 0).repeat(5, 1)[:h, :w]
  return {
    'image': tf.constant(rng.integers(0, 256, (h, w, 3), np.uint8)),
    'label': tf.constant(label.astype(np.uint8)),
  }


# ----------------------------------------------------------------------------------------
# NumPy restatements of mmcv / mmseg.


def np_rescale_size(h, w, scale, ratio):
  """mmcv RandomResize._random_sample_ratio + rescale_size + _scale_size, as written there."""
  target = int(scale[0] * ratio), int(scale[1] * ratio)
  factor = min(max(target) / max(h, w), min(target) / min(h, w))
  return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def np_nearest(label, out_h, out_w):
  """cv2 INTER_NEAREST: src = floor(dst * (1 / (out / in))), clamped."""
  h, w = label.shape
  rows = np.minimum(np.floor(np.arange(out_h) * (1 / (out_h / h))).astype(int), h - 1)
  cols = np.minimum(np.floor(np.arange(out_w) * (1 / (out_w / w))).astype(int), w - 1)
  return label[rows][:, cols]


def np_random_crop(label, candidates, crop, cat_max_ratio=0.75, ignore=255):
  """mmseg RandomCrop.crop_bbox with its np.random.randint draws replaced by `candidates`."""
  draws = iter(candidates)

  def generate():
    top, left = next(draws)
    return top, top + crop[0], left, left + crop[1]

  box = generate()
  for _ in range(10):
    labels, counts = np.unique(label[box[0] : box[1], box[2] : box[3]], return_counts=True)
    counts = counts[labels != ignore]
    if len(counts) > 1 and np.max(counts) / np.sum(counts) < cat_max_ratio:
      break
    box = generate()
  return box


def np_convert(x, alpha=1.0, beta=0.0):
  """PhotoMetricDistortion.convert: float32 arithmetic, clip, astype(uint8)."""
  return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0, 255).astype(
    np.uint8
  )


def np_photometric(image, d, rgb2hsv, hsv2rgb):
  """PhotoMetricDistortion.transform with the draws d and the given HSV conversions."""
  img = image.astype(np.uint8)
  if d['brightness']:
    img = np_convert(img, beta=d['beta'])
  if d['contrast'] and not d['contrast_last']:
    img = np_convert(img, alpha=d['alpha'])
  if d['saturation']:
    hsv = rgb2hsv(img)
    hsv[..., 1] = np_convert(hsv[..., 1], alpha=d['saturation_alpha'])
    img = hsv2rgb(hsv)
  if d['hue']:
    hsv = rgb2hsv(img)
    hsv[..., 0] = (hsv[..., 0].astype(int) + int(d['hue_delta'])) % 180
    img = hsv2rgb(hsv)
  if d['contrast'] and d['contrast_last']:
    img = np_convert(img, alpha=d['alpha'])
  return img


def tf_rgb2hsv(x):
  return mmseg_augment.rgb_to_hsv(tf.constant(x)).numpy().astype(np.uint8)


def tf_hsv2rgb(x):
  return mmseg_augment.hsv_to_rgb(tf.constant(x)).numpy().astype(np.uint8)


# ----------------------------------------------------------------------------------------
# Against OpenCV's outputs.


def test_hsv_conversions_equal_opencv():
  rgb, hsv = REFERENCE['rgb'], REFERENCE['hsv']
  np.testing.assert_array_equal(tf_rgb2hsv(rgb), REFERENCE['hsv_of_rgb'])
  # 37 wide: OpenCV's SIMD blocks of 32 (truncated) and a 5-pixel scalar tail (rounded).
  np.testing.assert_array_equal(tf_hsv2rgb(hsv), REFERENCE['rgb_of_hsv'])


def test_resize_equals_opencv_bit_for_bit():
  source = REFERENCE['resize_source']
  for key in REFERENCE.files:
    if key.startswith('resize_') and key != 'resize_source':
      h, w = (int(v) for v in key.removeprefix('resize_').split('x'))
      expected = REFERENCE[key]
      np.testing.assert_array_equal(planning.resize_uint8(source, h, w), expected, err_msg=key)
      whole = (0, 0, h, w)
      got = mmseg_augment.resize_window(tf.constant(source), tf.constant([h, w]), whole).numpy()
      np.testing.assert_array_equal(got, expected, err_msg=key)
      # Any window is that part of the whole resize.
      window = (h // 3, w // 4, h - h // 3, max(1, w // 2))
      got = mmseg_augment.resize_window(tf.constant(source), tf.constant([h, w]), window).numpy()
      np.testing.assert_array_equal(got, expected[h // 3 :, w // 4 : w // 4 + window[3]])


@pytest.mark.parametrize('case', range(8))
def test_chain_equals_mmseg_itself(case):
  """mmseg's RandomResize, RandomCrop, RandomFlip, PhotoMetricDistortion, same draws."""
  prefix = f'chain{case}_'
  example = {'image': REFERENCE[prefix + 'image'], 'label': REFERENCE[prefix + 'label']}
  example = {k: tf.constant(v) for k, v in example.items()}
  out = mmseg_augment.mmseg_augment(
    example, tf.constant(REFERENCE[prefix + 'seed']), crop_size=CROP, scale=SCALE
  )
  expected_image, expected_label = REFERENCE[prefix + 'out_image'], REFERENCE[prefix + 'out_label']
  h, w = expected_label.shape
  image = out['image'].numpy() * STD + MEAN
  np.testing.assert_allclose(image[:h, :w], expected_image, atol=1e-3)
  np.testing.assert_array_equal(out['label'].numpy()[:h, :w], expected_label)
  # SegDataPreProcessor's padding: bottom / right, 0 after normalising, label 255.
  assert (out['label'].numpy()[h:] == 255).all() and (out['label'].numpy()[:, w:] == 255).all()
  assert (out['image'].numpy()[h:] == 0).all() and (out['image'].numpy()[:, w:] == 0).all()


def test_reference_chain_cases_cover_the_branches():
  sizes = [REFERENCE[f'chain{i}_out_label'].shape for i in range(8)]
  assert any(s == CROP for s in sizes) and any(s != CROP for s in sizes)  # full and small
  redrawn = 0
  for i in range(8):
    seed = tf.constant(REFERENCE[f'chain{i}_seed'])
    label = tf.constant(REFERENCE[f'chain{i}_label'])
    s = transforms.split_seed(seed, 4)
    size = tf.stack(
      mmseg_augment.rescale_size(*label.shape, SCALE, mmseg_augment.resize_ratio(s[0], (0.5, 2.0)))
    )
    top, left, _, _ = mmseg_augment.choose_crop(label, size, s[1], CROP, 0.75, 255)
    first = mmseg_augment.crop_candidates(s[1], size, CROP)[0].numpy().tolist()
    redrawn += [int(top), int(left)] != first
  assert redrawn >= 1


# ----------------------------------------------------------------------------------------
# Against the NumPy restatements.


@pytest.mark.parametrize(
  ('h', 'w', 'scale'),
  [
    (375, 500, (2048, 512)),
    (512, 683, (2048, 512)),
    (1024, 2048, (2048, 1024)),
    (97, 33, (128, 32)),
  ],
)
def test_rescale_size_is_mmcv(h, w, scale):
  for ratio in (0.5, 0.61803, 1.0, 1.37, 1.999):
    got = tuple(int(v) for v in mmseg_augment.rescale_size(h, w, scale, ratio))
    assert got == np_rescale_size(h, w, scale, ratio)
  assert tuple(int(v) for v in mmseg_augment.rescale_size(375, 500, (2048, 512), 1.0)) == (512, 683)


def test_resize_ratio_is_uniform_in_range():
  ratios = np.array([float(mmseg_augment.resize_ratio(s, (0.5, 2.0))) for s in seeds(200)])
  assert ratios.min() >= 0.5 and ratios.max() < 2.0 and ratios.std() > 0.3


def test_label_window_is_cv2_nearest():
  label = np.random.default_rng(0).integers(0, 200, (29, 41)).astype(np.uint8)
  for size in [(58, 82), (13, 20), (40, 29)]:
    full = np_nearest(label, *size)
    window = (3, 5, size[0] - 3, size[1] - 7)
    got = mmseg_augment.label_window(tf.constant(label), tf.constant(size), window).numpy()
    np.testing.assert_array_equal(got, full[3:, 5 : size[1] - 2])


def test_cat_max_ratio_test_and_crop_choice_equal_mmseg_rules():
  crop = tf.constant
  # Two classes 3:1 -> share 0.75, not < 0.75; 0.7 passes; one class fails; ignore excluded.
  quarter = np.zeros((4, 4), np.uint8)
  quarter[0] = 1
  assert not bool(mmseg_augment.crop_accepted(crop(quarter), 0.75, 255))
  assert bool(mmseg_augment.crop_accepted(crop(quarter), 0.76, 255))
  assert not bool(mmseg_augment.crop_accepted(crop(np.full((4, 4), 2, np.uint8)), 0.75, 255))
  mostly_ignored = np.full((4, 4), 255, np.uint8)
  mostly_ignored[0, :2], mostly_ignored[1, :2] = 3, 4
  assert bool(mmseg_augment.crop_accepted(crop(mostly_ignored), 0.75, 255))
  assert not bool(
    mmseg_augment.crop_accepted(crop(mostly_ignored), 0.75, 3)
  )  # 3 ignored: one class left

  chosen_later = 0
  for i, seed in enumerate(seeds(30, start=100)):
    ex = random_example(50, 64, i, classes=2)
    label = ex['label'].numpy()
    label[: 30 + i % 15] = 1  # often dominated by class 1
    size = tf.constant([55, 70])
    candidates = mmseg_augment.crop_candidates(seed, size, CROP).numpy()
    assert candidates[:, 0].max() <= 55 - 33 and candidates[:, 1].max() <= 70 - 41
    resized = np_nearest(label, 55, 70)
    box = np_random_crop(resized, candidates.tolist(), CROP)
    top, left, height, width = (
      int(v) for v in mmseg_augment.choose_crop(tf.constant(label), size, seed, CROP, 0.75, 255)
    )
    assert (top, left, height, width) == (box[0], box[2], 33, 41)
    chosen_later += (top, left) != tuple(candidates[0])
  assert chosen_later >= 3  # the re-draws happen


def test_crop_of_a_small_image_is_the_image():
  ex = random_example(20, 30, 1)
  window = mmseg_augment.choose_crop(
    ex['label'], tf.constant([20, 30]), seeds(1)[0], CROP, 0.75, 255
  )
  assert [int(v) for v in window] == [0, 0, 20, 30]


def test_photometric_equals_numpy_restatement_and_each_step_happens():
  image = np.random.default_rng(5).integers(0, 256, (19, 45, 3), np.uint8)
  opencv_like = (tf_rgb2hsv, tf_hsv2rgb)  # The HSV conversions are checked against OpenCV.
  seen = {k: set() for k in ('brightness', 'contrast', 'contrast_last', 'saturation', 'hue')}
  for seed in seeds(24, start=40):
    draws = {k: v.numpy() for k, v in mmseg_augment.photometric_draws(seed).items()}
    for k in seen:
      seen[k].add(bool(draws[k]))
    assert -32 <= draws['beta'] <= 32 and 0.5 <= draws['alpha'] <= 1.5
    assert 0.5 <= draws['saturation_alpha'] <= 1.5 and -18 <= draws['hue_delta'] < 18
    got = mmseg_augment.photometric_distortion(tf.constant(image), seed).numpy()
    np.testing.assert_array_equal(got, np_photometric(image, draws, *opencv_like))
  assert all(v == {False, True} for v in seen.values())


# ----------------------------------------------------------------------------------------
# Seeds: eager = tf.data, same seed same output, and the pipeline's exact resume.

OPS = {
  'chain': lambda e, s: mmseg_augment.mmseg_augment(e, s, crop_size=CROP, scale=SCALE),
  'chain_black_pad': lambda e, s: mmseg_augment.mmseg_augment(
    e, s, crop_size=CROP, scale=SCALE, pad='black'
  ),
  'photometric': lambda e, s: {'image': mmseg_augment.photometric_distortion(e['image'], s)},
  'crop': lambda e, s: {
    'image': tf.stack(
      mmseg_augment.choose_crop(e['label'], tf.constant([45, 64]), s, CROP, 0.75, 255)
    )
  },
}


@pytest.mark.parametrize('name', sorted(OPS))
def test_op_gives_the_same_result_eagerly_and_in_tf_data(name):
  op = OPS[name]
  example = random_example(45, 64, 7, classes=2)
  seed_list = seeds(4, start=9)
  dataset = tf.data.Dataset.from_tensor_slices(tf.stack(seed_list)).map(lambda s: op(example, s))
  for seed, graph in zip(seed_list, dataset, strict=True):
    eager = op(example, seed)
    for key in eager:
      np.testing.assert_array_equal(graph[key].numpy(), eager[key].numpy())


def test_same_seed_same_result_other_seed_differs():
  example = random_example(45, 64, 8)
  op = OPS['chain']
  a, b, c = (op(example, tf.constant(s, tf.int64)) for s in ([1, 2], [1, 2], [1, 3]))
  np.testing.assert_array_equal(a['image'].numpy(), b['image'].numpy())
  np.testing.assert_array_equal(a['label'].numpy(), b['label'].numpy())
  assert not np.array_equal(a['image'].numpy(), c['image'].numpy())


def test_black_padding_is_raw_zero():
  example = random_example(12, 16, 2)  # smaller than the crop at any ratio here
  out = mmseg_augment.mmseg_augment(
    example, seeds(1)[0], crop_size=CROP, scale=(16, 12), ratio_range=None, pad='black'
  )
  image = out['image'].numpy() * STD + MEAN
  np.testing.assert_allclose(image[12:], 0.0, atol=1e-3)
  assert (out['label'].numpy()[12:] == 255).all()


def mmseg_data_config(**overrides):
  config = data_config(recipe='mmseg', rotate_range=None, blur=False)
  config.mmseg = ml_collections.ConfigDict(
    dict(scale=(96, 40), cat_max_ratio=0.75, photometric=True, pad='mean')
  )
  config.update(overrides)
  return config


def test_pipeline_mmseg_recipe_batches_and_exact_resume():
  config = mmseg_data_config()
  through = take(pipeline.build_train_dataset(source(), config, batch_size=4, seed=0), 5)
  for batch in through:
    assert batch['image'].shape == (4, 33, 33, 3) and batch['label'].dtype == np.int32
    assert set(np.unique(batch['label'])) <= set(range(7)) | {255}
  again = take(pipeline.build_train_dataset(source(), config, batch_size=4, seed=0), 5)
  assert_same_batches(through, again)
  resumed = pipeline.build_train_dataset(source(), config, batch_size=4, seed=0, start_step=3)
  assert_same_batches(through[3:], take(resumed, 2))
  official = take(pipeline.build_train_dataset(source(), data_config(), batch_size=4, seed=0), 1)
  assert not np.array_equal(official[0]['image'], through[0]['image'])


def test_pipeline_mmseg_recipe_rejects_bad_keys():
  for overrides, match in [
    (dict(rotate_range=(-10.0, 10.0)), 'rotate_range=None'),
    (dict(blur=True), 'blur=False'),
    (dict(recipe='mmcv'), 'data.recipe'),
  ]:
    with pytest.raises(ValueError, match=match):
      pipeline.build_train_dataset(source(), mmseg_data_config(**overrides), batch_size=2, seed=0)
  for key, value, match in [
    ('pad', 'edge', 'data.mmseg.pad'),
    ('cat_max_ratio', 0.0, 'cat_max_ratio'),
    ('scale', (96,), 'data.mmseg.scale'),
  ]:
    config = mmseg_data_config()
    with config.ignore_type():
      config.mmseg[key] = value
    with pytest.raises(ValueError, match=match):
      pipeline.build_train_dataset(source(), config, batch_size=2, seed=0)
