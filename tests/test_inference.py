"""Tests of psp_jax.inference.sliding_window against a NumPy transcription of tool/test.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

from psp_jax.inference.planning import (
  MEAN,
  STD,
  linear_indices,
  resize_bilinear,
  scaled_size,
  window_grid,
)
from psp_jax.inference.sliding_window import InferenceConfig, SlidingWindowInference, scale_canvases
from psp_jax.models import PSPNet

from helpers import dense_resize_matrix, random_variables, semseg_test_reference

NUM_CLASSES = 5
CROP = (33, 33)


@pytest.fixture(scope='module')
def model_and_variables():
  model = PSPNet(num_classes=NUM_CLASSES, depth=18, width=8, head_channels=16, aux_channels=8)
  return model, random_variables(model)


@pytest.fixture(scope='module')
def apply_fn(model_and_variables):
  model, _ = model_and_variables
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


@pytest.fixture(scope='module')
def slide_ms(model_and_variables, apply_fn):
  """Multi-scale sliding window, small tiles so images span several of them.

  Base 48: at scale 0.5 every image is below the 33 px crop (mean padding on both sides), at
  1.5 the long side is 72 (up to 3 x 3 windows).
  """
  procedure = InferenceConfig(crop_size=CROP, base_size=48, scales=(0.5, 1.5), tile_size=32)
  return SlidingWindowInference(
    apply_fn, model_and_variables[1], num_classes=NUM_CLASSES, procedure=procedure
  )


def _images(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


# --- Host-side geometry -------------------------------------------------------------------


@pytest.mark.parametrize('in_size,out_size', [(4, 8), (8, 4), (7, 3), (5, 13), (13, 13), (1, 3)])
def test_linear_indices_equal_dense_interpolation(in_size, out_size):
  i0, i1, f = linear_indices(in_size, out_size)
  m = np.zeros((out_size, in_size))
  np.add.at(m, (np.arange(out_size), i0), 1 - f)
  np.add.at(m, (np.arange(out_size), i1), f)
  np.testing.assert_allclose(m, dense_resize_matrix(in_size, out_size), atol=1e-5)


def test_resize_bilinear_known_values():
  ramp = np.arange(4, dtype=np.float32)[None, :, None].repeat(2, 0)
  up = resize_bilinear(ramp, 2, 8)[0, :, 0]
  np.testing.assert_allclose(up, [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])
  down = resize_bilinear(np.arange(8, dtype=np.float32)[None, :, None], 1, 4)[0, :, 0]
  np.testing.assert_allclose(down, [0.5, 2.5, 4.5, 6.5])  # No antialiasing: 2-tap means.


@pytest.mark.torch
def test_resize_bilinear_equals_torch_align_corners_false():
  torch = pytest.importorskip('torch')
  image = np.random.default_rng(1).uniform(0, 255, (37, 50, 3)).astype(np.float32)
  for size in [(74, 100), (19, 25), (23, 61), (37, 50)]:
    ref = torch.nn.functional.interpolate(
      torch.from_numpy(image).permute(2, 0, 1)[None], size, mode='bilinear', align_corners=False
    )[0].permute(1, 2, 0)
    np.testing.assert_allclose(resize_bilinear(image, *size), ref.numpy(), rtol=1e-5, atol=1e-3)


def test_scaled_size_follows_python_round():
  assert scaled_size(375, 500, 1.0, 512) == (384, 512)
  assert scaled_size(500, 375, 1.0, 512) == (512, 384)
  assert scaled_size(300, 300, 0.75, 512) == (384, 384)
  # round(0.5 * 473) = round(236.5) = 236 (half to even), as in tool/test.py.
  assert scaled_size(100, 200, 0.5, 473) == (118, 236)
  assert scaled_size(1024, 2048, 1.0, 2048) == (1024, 2048)


def test_window_grid_matches_scale_process():
  (top, left), padded, offsets = window_grid(512, 683, (473, 473), 2 / 3)
  assert (top, left, padded) == (0, 0, (512, 683))
  # stride ceil(473 * 2/3) = 316; last windows shifted back to end at the border.
  assert offsets.tolist() == [[0, 0], [0, 210], [39, 0], [39, 210]]
  (top, left), padded, offsets = window_grid(300, 400, (473, 473), 2 / 3)
  assert (top, left, padded, offsets.tolist()) == (86, 36, (473, 473), [[0, 0]])


# --- NumPy transcription of tool/test.py ------------------------------------------------


@pytest.mark.parametrize('size', [(20, 27), (50, 41), (64, 90)])
def test_multiscale_slide_equals_reference(slide_ms, apply_fn, model_and_variables, size):
  (image,) = _images([size], seed=size[0])
  probs = slide_ms.probabilities(image)
  assert probs.shape == (*size, NUM_CLASSES)  # Back at the original size.
  cfg = slide_ms.procedure
  args = (apply_fn, model_and_variables[1], image, CROP, cfg.base_size, cfg.scales)
  ref = semseg_test_reference(*args, classes=NUM_CLASSES)
  np.testing.assert_allclose(probs, ref, atol=2e-5)
  labels = slide_ms.predict(image)
  top2 = np.sort(ref, -1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 1e-4  # Leave out float near-ties.
  np.testing.assert_array_equal(labels[clear], ref.argmax(-1)[clear])


def test_several_windows_per_forward_change_nothing(apply_fn, model_and_variables):
  variables = model_and_variables[1]
  # 64x90 at scale 1.75 of base 48 is 60x84: 3 x 4 windows, in forwards of 5, 5 and 2.
  procedure = InferenceConfig(crop_size=CROP, base_size=48, scales=(1.75,), windows_per_step=5)
  slide = SlidingWindowInference(apply_fn, variables, num_classes=NUM_CLASSES, procedure=procedure)
  (image,) = _images([(64, 90)], seed=5)
  plan = slide.plan(image)
  assert plan.scales[0].num_windows == 12
  ref = semseg_test_reference(apply_fn, variables, image, CROP, 48, (1.75,), classes=NUM_CLASSES)
  np.testing.assert_allclose(slide.probabilities(image), ref, atol=2e-5)


def _hand_forward(apply_fn, variables, image, flip):
  """Softmax of one whole normalised image, averaged with a hand-flipped forward."""
  x = jnp.asarray(((image.astype(np.float32) - MEAN) / STD)[None])
  probs = jax.nn.softmax(apply_fn(variables, x), -1)[0]
  if flip:
    flipped = jax.nn.softmax(apply_fn(variables, jnp.flip(x, axis=2)), -1)[0]
    probs = (probs + jnp.flip(flipped, axis=1)) / 2
  return np.asarray(probs)


@pytest.mark.parametrize('flip', [True, False])
def test_crop_equal_to_image_is_one_whole_forward(apply_fn, model_and_variables, flip):
  variables = model_and_variables[1]
  (image,) = _images([(40, 56)], seed=3)
  # base_size 56 keeps the size; a 40x56 crop is then the whole image: one window.
  procedure = InferenceConfig(crop_size=(40, 56), base_size=56, flip=flip, tile_size=64)
  slide = SlidingWindowInference(apply_fn, variables, num_classes=NUM_CLASSES, procedure=procedure)
  expected = _hand_forward(apply_fn, variables, image, flip)
  np.testing.assert_allclose(slide.probabilities(image), expected, atol=1e-5)
  if flip:  # The flip changes the answer, so the check above can tell them apart.
    assert np.abs(expected - _hand_forward(apply_fn, variables, image, False)).max() > 1e-4


def test_crop_larger_than_image_equals_whole_mode(apply_fn, model_and_variables):
  variables = model_and_variables[1]
  (image,) = _images([(40, 56)], seed=4)
  common = dict(base_size=56, tile_size=64)
  slide = SlidingWindowInference(
    apply_fn,
    variables,
    num_classes=NUM_CLASSES,
    procedure=InferenceConfig(crop_size=(64, 64), **common),
  )
  whole = SlidingWindowInference(
    apply_fn,
    variables,
    num_classes=NUM_CLASSES,
    procedure=InferenceConfig(mode='whole', whole_multiple=64, **common),
  )
  # By hand: the image in the middle of a 64x64 mean-padded square, one forward.
  padded = np.tile(MEAN, (64, 64, 1))
  padded[12:52, 4:60] = image
  expected = _hand_forward(apply_fn, variables, padded, True)[12:52, 4:60]
  np.testing.assert_allclose(slide.probabilities(image), expected, atol=1e-5)
  np.testing.assert_allclose(whole.probabilities(image), expected, atol=1e-5)


def test_one_and_eight_devices_agree(slide_ms, apply_fn, model_and_variables):
  assert len(jax.local_devices()) == 8
  sizes = [(20, 27), (50, 41), (64, 90), (33, 33), (17, 60), (71, 12), (45, 45), (30, 70)]
  images = _images(sizes, seed=7)
  labels8, _ = slide_ms.run([slide_ms.plan(im) for im in images])
  single = SlidingWindowInference(
    apply_fn,
    model_and_variables[1],
    num_classes=NUM_CLASSES,
    procedure=slide_ms.procedure,
    devices=jax.local_devices()[:1],
  )
  for image, labels in zip(images, labels8, strict=True):
    assert labels.shape == image.shape[:2]
    np.testing.assert_array_equal(single.predict(image), labels)


def _count_compilations():
  """A list that grows by one for every XLA compilation until the context exits."""
  compiles = []

  def listener(event, duration, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(duration)

  class Counter:
    def __enter__(self):
      monitoring.register_event_duration_secs_listener(listener)
      return compiles

    def __exit__(self, *exc):
      monitoring.unregister_event_duration_listener(listener)

  return Counter()


@pytest.mark.slow  # 12-15 s on 2 cores: compiles for many sizes.
def test_compilations_do_not_grow_with_image_sizes(slide_ms, apply_fn, model_and_variables):
  slide_ms.predict(_images([(20, 27)])[0])  # Warm up every compiled function.
  sizes = [(23, 31), (48, 47), (9, 80), (77, 52), (60, 61), (31, 16), (100, 7)]
  with _count_compilations() as compiles:
    for image in _images(sizes, seed=11):
      assert slide_ms.predict(image).shape == image.shape[:2]
  assert compiles == []

  # Whole-image mode: one compilation per size bucket, not per image.
  whole = SlidingWindowInference(
    apply_fn,
    model_and_variables[1],
    num_classes=NUM_CLASSES,
    procedure=InferenceConfig(mode='whole', base_size=48, whole_multiple=16, tile_size=32),
  )
  first = _images([(48, 30), (40, 48), (48, 36), (37, 48), (48, 48), (20, 48)], seed=12)
  # Long side 48; the short sides fall in the buckets 32 and 48: 3 shapes for 6 images.
  buckets = {whole.plan(image).key for image in first}
  assert len(buckets) == 3
  before = scale_canvases._cache_size()
  for image in first:
    assert whole.predict(image).shape == image.shape[:2]
  assert scale_canvases._cache_size() - before <= len(buckets)
  with _count_compilations() as compiles:
    for image in _images([(48, 33), (45, 48), (48, 17), (96, 50)], seed=13):
      assert whole.plan(image).key in buckets
      assert whole.predict(image).shape == image.shape[:2]
  assert compiles == []
