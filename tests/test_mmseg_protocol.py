"""mmsegmentation's test protocol as an evaluation setting, against a restatement of mmseg.

The restatement follows mmseg 1.2.2 (mmseg/models/segmentors/encoder_decoder.py
slide_inference / whole_inference, base.py postprocess_result) and mmcv 2.1.0 (Resize with
keep_ratio: rescale_size): the image resized to fit the scale (cv2 on uint8:
planning.resize_uint8, checked against OpenCV in tests/test_mmseg_augment.py), windows clipped
to the image, logits summed and divided by the count, then torch's bilinear resize
(align_corners=False) to the original size and argmax.
"""

import dataclasses
import importlib
import json
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from psp_jax import config_schema, errors, metrics, weights
from psp_jax.data import pipeline, sources
from psp_jax.inference import evaluation, planning
from psp_jax.inference.planning import MEAN, STD, InferenceConfig, fit_size, window_grid
from psp_jax.inference.sliding_window import SlidingWindowInference
from psp_jax.models import PSPNet
from psp_jax.train import config_checks

from helpers import ROOT, random_variables

K = 5
MMSEG_VARIANT = dict(stem='deep_v1c', contract_dilation=True, align_corners=False)
TINY = dict(depth=18, width=8, head_channels=16, aux_channels=8, **MMSEG_VARIANT)


def mmseg_procedure(**overrides):
  kwargs = dict(resize='fit', clip_windows=True, average='logits', flip=False, crop_size=(33, 33))
  return InferenceConfig(**{**kwargs, **overrides})


# ----------------------------------------------------------------------------------------
# The restatement.


def np_fit_size(h, w, scale):
  """mmcv rescale_size((w, h), scale tuple) then _scale_size: int(x * factor + 0.5)."""
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def mmseg_windows(h_img, w_img, crop, stride):
  """The (y1, y2, x1, x2) slide_inference visits, in its order."""
  (h_crop, w_crop), (h_stride, w_stride) = crop, stride
  h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
  w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
  out = []
  for h_idx in range(h_grids):
    for w_idx in range(w_grids):
      y1, x1 = h_idx * h_stride, w_idx * w_stride
      y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
      out.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
  return out


def mmseg_logits(apply_fn, variables, image, *, scale, mode, crop=None, stride=None):
  """mmseg's test of one uint8 image: logits [H, W, K] at the original size."""
  h, w = image.shape[:2]
  new_h, new_w = np_fit_size(h, w, scale)
  x = ((planning.resize_uint8(image, new_h, new_w) - MEAN) / STD).astype(np.float32)
  if mode == 'whole':
    logits = np.asarray(apply_fn(variables, x[None]))[0]
  else:
    logits, count = 0.0, np.zeros((new_h, new_w, 1))
    for y1, y2, x1, x2 in mmseg_windows(new_h, new_w, crop, stride):
      window = np.asarray(apply_fn(variables, x[None, y1:y2, x1:x2]))[0]
      logits = logits + np.pad(window, [(y1, new_h - y2), (x1, new_w - x2), (0, 0)])  # F.pad
      count[y1:y2, x1:x2] += 1
    assert (count > 0).all()
    logits = (logits / count).astype(np.float32)
  torch = pytest.importorskip('torch')  # The core-only CI leg has no torch.
  t = torch.from_numpy(np.array(logits)).permute(2, 0, 1)[None]
  t = torch.nn.functional.interpolate(t, size=(h, w), mode='bilinear', align_corners=False)
  return t[0].permute(1, 2, 0).numpy()


@pytest.fixture(scope='module')
def model():
  net = PSPNet(num_classes=K, **TINY)
  variables = random_variables(net, seed=3)
  return jax.jit(lambda v, x: net.apply(v, x, train=False)), variables


def _images(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def assert_same_prediction(got_logits, got_labels, ref):
  np.testing.assert_allclose(got_logits, ref, atol=2e-4)
  top2 = np.sort(ref, -1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 1e-3  # Leave out float near-ties.
  assert clear.mean() > 0.95
  np.testing.assert_array_equal(got_labels[clear], ref.argmax(-1)[clear])


# ----------------------------------------------------------------------------------------
# Sizes and windows.


def test_defaults_are_the_official_protocol():
  config = config_schema.get_config()
  assert InferenceConfig.from_config(config) == InferenceConfig(crop_size=473)
  official = InferenceConfig()
  assert (official.resize, official.average, official.clip_windows, official.stride) == (
    'long_side',
    'probs',
    False,
    0,
  )
  assert official.strides == (316, 316)  # ceil(473 * 2/3)


@pytest.mark.parametrize(
  ('h', 'w', 'scale', 'expected'),
  [
    ((375, 500, (2048, 512), (512, 683))),  # VOC: short side 512
    ((500, 375, (2048, 512), (683, 512))),
    ((1024, 2048, (2048, 1024), (1024, 2048))),  # Cityscapes 512x1024: unchanged
    ((1024, 2048, (2049, 1025), (1025, 2049))),  # Cityscapes 769x769
    ((200, 1000, (2048, 512), (410, 2048))),  # the long side limits
    ((256, 256, (2048, 512), (512, 512))),
  ],
)
def test_fit_size_is_mmcv_rescale_size(h, w, scale, expected):
  assert fit_size(h, w, 1.0, scale) == np_fit_size(h, w, scale) == expected


def test_fit_size_at_other_scales_fits_the_scaled_edges():
  rng = np.random.default_rng(0)
  for h, w in rng.integers(20, 900, (50, 2)):
    for s in (0.5, 0.75, 1.25):
      assert fit_size(h, w, s, (2048, 512)) == np_fit_size(h, w, (int(2048 * s), int(512 * s)))


@pytest.mark.parametrize(
  ('h', 'w', 'crop', 'stride'),
  [
    (1025, 2050, (769, 769), (513, 513)),
    (512, 683, (480, 480), (320, 320)),
    (60, 97, (33, 33), (20, 20)),
  ],
)
def test_window_grid_is_slide_inference_for_images_larger_than_the_crop(h, w, crop, stride):
  _, padded, offsets = window_grid(h, w, crop, stride=stride)
  assert padded == (h, w)
  expected = [(y1, x1) for y1, _, x1, _ in mmseg_windows(h, w, crop, stride)]
  assert [tuple(o) for o in offsets.tolist()] == expected


def test_windows_clipped_to_a_small_image():
  procedure = mmseg_procedure(fit_scale=(64, 40), stride=20)
  image = np.zeros((10, 60, 3), np.uint8)  # fits as 11 x 64: shorter than the crop
  (scale_plan,) = planning.plan_image(image, procedure).scales
  assert scale_plan.crop == (11, 33)  # mmseg runs the window at the image's own height
  expected = [(y1, x1) for y1, _, x1, _ in mmseg_windows(11, 64, (33, 33), (20, 20))]
  got = [tuple(o) for o in scale_plan.offsets[: scale_plan.num_windows].tolist()]
  assert got == expected == [(0, 0), (0, 20), (0, 31)]
  assert scale_plan.canvas.shape[:2] == (40, 64)  # every wide image of this scale fits it


# ----------------------------------------------------------------------------------------
# Whole pipeline on a tiny mmseg-variant PSPNet.


@pytest.mark.slow  # 15-20 s on 2 cores: a compile per window shape.
def test_slide_equals_mmseg_restatement(model):
  apply_fn, variables = model
  procedure = mmseg_procedure(mode='slide', fit_scale=(64, 40), stride=20, tile_size=32)
  inference = SlidingWindowInference(apply_fn, variables, num_classes=K, procedure=procedure)
  # Wide (2 x 3 windows), tall, and one whose short side ends up below the crop.
  for image in _images([(30, 50), (50, 30), (10, 60)], seed=1):
    ref = mmseg_logits(apply_fn, variables, image, scale=(64, 40), mode='slide',
                       crop=(33, 33), stride=(20, 20))  # fmt: skip
    assert_same_prediction(inference.probabilities(image), inference.predict(image), ref)


@pytest.mark.slow  # 15-20 s on 2 cores: a compile per image size.
def test_whole_equals_mmseg_restatement(model):
  apply_fn, variables = model
  procedure = mmseg_procedure(mode='whole', fit_scale=(64, 40), whole_multiple=1, tile_size=32)
  inference = SlidingWindowInference(apply_fn, variables, num_classes=K, procedure=procedure)
  for image in _images([(30, 50), (41, 29)], seed=2):
    ref = mmseg_logits(apply_fn, variables, image, scale=(64, 40), mode='whole')
    assert_same_prediction(inference.probabilities(image), inference.predict(image), ref)


def test_averaging_logits_is_not_averaging_probabilities(model):
  apply_fn, variables = model
  image = _images([(30, 50)], seed=1)[0]
  procedure = mmseg_procedure(mode='slide', fit_scale=(64, 40), stride=20, tile_size=32)
  ref = mmseg_logits(apply_fn, variables, image, scale=(64, 40), mode='slide',
                     crop=(33, 33), stride=(20, 20))  # fmt: skip
  probs_procedure = dataclasses.replace(procedure, average='probs')
  probs = SlidingWindowInference(
    apply_fn, variables, num_classes=K, procedure=probs_procedure
  ).probabilities(image)
  assert np.abs(probs - ref).max() > 0.1  # softmax values, not logits
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Configs and the command line.


@pytest.mark.parametrize('name', ['mmseg_ade20k', 'mmseg_cityscapes', 'mmseg_voc2012'])
def test_mmseg_configs_hold_mmseg_settings(name):
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  module = importlib.import_module(f'configs.{name}')
  for variant, (depth, steps, miou, checkpoint) in module.VARIANTS.items():
    config = module.get_config(variant)
    config_checks.validate(config, device_count=8, process_count=1)
    assert f'{miou:.2f}' in module.__doc__ and checkpoint in module.__doc__
    assert checkpoint.startswith(f'pspnet_r{depth}-d8_') and (
      config.model.depth,
      config.num_train_steps,
    ) == (depth, steps)
    assert {k: config.model[k] for k in MMSEG_VARIANT} == MMSEG_VARIANT
    optim = config.optim
    assert (optim.base_lr, optim.momentum, optim.weight_decay, optim.power) == (
      0.01,
      0.9,
      5e-4,
      0.9,
    )
    assert (optim.min_lr, optim.head_lr_mult, optim.aux_weight) == (1e-4, 1.0, 0.4)
    assert optim.loss_normalization == 'all'  # CrossEntropyLoss(avg_non_ignore=False)
    data = config.data
    assert (data.recipe, data.mmseg.cat_max_ratio, data.mmseg.pad) == ('mmseg', 0.75, 'mean')
    assert tuple(data.scale_range) == (0.5, 2.0) and data.flip and data.mmseg.photometric
    kwargs = pipeline.mmseg_kwargs(data)
    assert kwargs['scale'] == tuple(config.eval.fit_scale)
    ev = InferenceConfig.from_config(config)
    assert (ev.mode, ev.resize, ev.flip, ev.average, ev.whole_multiple) == (
      'whole',
      'fit',
      False,
      'logits',
      1,
    )
    assert ev.scales == (1.0,) and config.eval.protocol == 'mmseg'
  default = module.get_config()
  assert default.model.depth == 50
  with pytest.raises(ValueError, match='Unknown variant'):
    module.get_config('r18-1k')
  if name == 'mmseg_cityscapes':
    assert (default.batch_size, tuple(default.data.crop_size)) == (8, (512, 1024))
    assert tuple(default.eval.fit_scale) == (2048, 1024)
  else:
    assert (default.batch_size, default.data.crop_size, tuple(default.eval.fit_scale)) == (
      16,
      512,
      (2048, 512),
    )


def test_bad_eval_keys_name_the_key():
  """The one check of config.eval's values is the inference's (InferenceConfig.from_config,
  which predict, evaluate and training run; tests/test_config_schema.py runs the last two)."""
  for key, value, match in [
    ('resize', 'short_side', 'config.eval.resize'),
    ('average', 'softmax', 'config.eval.average'),
    ('stride', -1, 'config.eval.stride'),
  ]:
    config = config_schema.get_config()
    config.eval[key] = value
    config_checks.validate(config, device_count=1, process_count=1)  # Not the training's.
    with pytest.raises(errors.InvalidInputError, match=match):
      InferenceConfig.from_config(config)


@pytest.mark.e2e
def test_command_line_mmseg_protocol_equals_restatement(tmp_path):
  """python -m psp_jax.evaluate with mmseg's protocol on the generated data set."""
  num_classes = 11
  net = PSPNet(num_classes=num_classes, **TINY)
  variables = random_variables(net, seed=4)
  model_config = dict(num_classes=num_classes, **TINY)
  weights.save_variables(tmp_path / 'ckpt', variables, model_config)
  overrides = {
    'data.data_dir': tmp_path / 'data',
    'data.synthetic.image_size': 40,
    'data.synthetic.num_train': 1,
    'data.synthetic.num_val': 4,
    'data.crop_size': 33,
    'eval.mode': 'slide',
    'eval.resize': 'fit',
    'eval.fit_scale': '(72,48)',  # 40 x 40 -> 48 x 48: 2 x 2 windows of 33, stride 15
    'eval.stride': 15,
    'eval.clip_windows': True,
    'eval.average': 'logits',
    'eval.flip': False,
    'eval.protocol': 'mmseg',
    'model.dtype': 'float32',
  }
  args = [f'--config.{k}={v}' for k, v in overrides.items()]
  result = subprocess.run(
    [sys.executable, '-m', 'psp_jax.evaluate', f'--config={ROOT}/configs/synthetic.py']
    + [f'--checkpoint={tmp_path / "ckpt"}', f'--output_dir={tmp_path / "out"}', *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  res = json.loads((tmp_path / 'out' / 'results.json').read_text())
  setup = res['setup']
  assert (setup['resize'], setup['fit_scale'], setup['stride']) == ('fit', [72, 48], [15, 15])
  assert (setup['average'], setup['clip_windows'], setup['flip']) == ('logits', True, False)
  assert res['protocol'] == 'mmseg' and setup['images'] == 4

  # The same examples through the restatement.
  data = ml_collections.ConfigDict(
    dict(name='synthetic', data_dir=str(tmp_path / 'data'), num_classes=num_classes,
         skip_bad_examples=False, synthetic=dict(image_size=40, num_train=1, num_val=4, seed=0))
  )  # fmt: skip
  jitted = jax.jit(lambda v, x: net.apply(v, x, train=False))
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for example in pipeline.numpy_batches(sources.get_source(data, 'validation')):
    logits = mmseg_logits(jitted, variables, example['image'], scale=(72, 48), mode='slide',
                          crop=(33, 33), stride=(15, 15))  # fmt: skip
    label = example['label'].astype(np.int64)
    valid = label != 255
    np.add.at(confusion, (label[valid], logits.argmax(-1)[valid]), 1)
  expected = metrics.compute_metrics(confusion, protocol='mmseg')
  assert confusion.sum() == sum(c['pixels'] for c in res['per_class'])
  assert abs(res['mIoU'] - expected['mIoU']) < 2e-3
  assert (
    evaluation.PROTOCOL_NOTES['mmseg'].split(' ')[0]
    in (tmp_path / 'out' / 'results.txt').read_text()
  )
