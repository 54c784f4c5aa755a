"""Writes tests/data/mmseg_reference.npz: OpenCV's and mmsegmentation's own outputs.

Run once by hand, with what the project never needs installed next to it:

  pip install opencv-python-headless==4.10.0.84 mmsegmentation==1.2.2 mmcv-lite==2.1.0 \\
      mmengine==0.10.7 ftfy regex
  python tests/data/make_mmseg_reference.py

(mmseg.datasets imports mmcv.ops, which mmcv-lite lacks: a stand-in module is put in
sys.modules below.) Measured on x86-64 with AVX2 / AVX-512 (OpenCV 4.10.0).

Contents: cv2.cvtColor RGB -> HSV of random colours; HSV -> RGB of random HSV rows 37 pixels
wide (OpenCV's SIMD blocks of 32 and a scalar tail); cv2.resize INTER_LINEAR of one uint8
image to several sizes (an exact 2x shrink among them); and mmseg's RandomResize,
RandomCrop(cat_max_ratio=0.75), RandomFlip and PhotoMetricDistortion run on small examples
with their random draws forced to the ones psp_jax.data.mmseg_augment takes from a seed, so
tests/test_mmseg_augment.py can check the TF chain against mmseg itself.
"""

import pathlib
import sys
import types

import cv2
import numpy as np
import tensorflow as tf

sys.modules['mmcv.ops'] = types.SimpleNamespace(point_sample=None)  # mmcv-lite has no ops

import mmseg.datasets  # noqa: E402, F401 (registers the transforms)
import mmseg.datasets.transforms.transforms as mmseg_transforms  # noqa: E402
from mmcv.transforms import RandomFlip, RandomResize  # noqa: E402
from mmseg.registry import TRANSFORMS  # noqa: E402

from psp_jax.data import mmseg_augment, transforms  # noqa: E402

OUT = pathlib.Path(__file__).with_name('mmseg_reference.npz')
CROP = (33, 41)
SCALE = (128, 32)
RESIZE_SIZES = [(37, 45), (11, 17), (12, 16), (48, 64), (24, 32), (70, 20)]


def example(i, rng):
  h, w = int(rng.integers(20, 70)), int(rng.integers(20, 90))
  yy, xx = np.mgrid[0:h, 0:w]
  image = np.stack([127 + 120 * np.sin(xx / 5.0 + c) * np.cos(yy / 7.0 - c) for c in range(3)])
  image = np.clip(image.transpose(1, 2, 0) + rng.normal(0, 10, (h, w, 3)), 0, 255)
  label = rng.integers(0, 3, (h // 6 + 1, w // 6 + 1)).repeat(6, 0).repeat(6, 1)[:h, :w]
  label[rng.random((h, w)) < 0.05] = 255
  if i % 3 == 0:
    label[: h // 2 + 8] = 1  # one class dominates many crops: RandomCrop re-draws
  return image.astype(np.uint8), label.astype(np.uint8)


def mmseg_chain(image, label, seed):
  """mmseg's four transforms with the draws mmseg_augment makes from `seed`."""
  seeds = transforms.split_seed(tf.constant(seed, tf.int64), 4)
  h, w = label.shape
  ratio = float(mmseg_augment.resize_ratio(seeds[0], (0.5, 2.0)))
  size = tf.stack(mmseg_augment.rescale_size(h, w, SCALE, ratio))
  offsets = iter(mmseg_augment.crop_candidates(seeds[1], size, CROP).numpy().reshape(-1).tolist())
  flip = bool(transforms.coin(seeds[2], mmseg_augment.FLIP_P))
  d = {k: v.numpy() for k, v in mmseg_augment.photometric_draws(seeds[3]).items()}
  mode = 0 if d['contrast_last'] else 1
  contrast = [int(d['contrast'])] + ([float(d['alpha'])] if d['contrast'] else [])
  queue = [int(d['brightness'])] + ([float(d['beta'])] if d['brightness'] else []) + [mode]
  queue += contrast if mode == 1 else []
  queue += [int(d['saturation'])] + ([float(d['saturation_alpha'])] if d['saturation'] else [])
  queue += [int(d['hue'])] + ([int(d['hue_delta'])] if d['hue'] else [])
  queue += contrast if mode == 0 else []
  draws = iter(queue)  # in PhotoMetricDistortion's call order

  RandomResize._random_scale = lambda self: (int(SCALE[0] * ratio), int(SCALE[1] * ratio))
  mmseg_transforms.np.random.randint = lambda low, high=None: next(offsets)
  RandomFlip._choose_direction = lambda self: 'horizontal' if flip else None
  mmseg_transforms.random = types.SimpleNamespace(
    randint=lambda *a: next(draws), uniform=lambda *a: next(draws)
  )
  steps = [
    dict(type='RandomResize', scale=SCALE, ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=CROP, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
  ]
  results = dict(img=image[..., ::-1].copy(), gt_seg_map=label.copy(), seg_fields=['gt_seg_map'])
  for step in steps:
    results = TRANSFORMS.build(step)(results)
  return results['img'][..., ::-1].copy(), results['gt_seg_map']


def main():
  rng = np.random.default_rng(0)
  out = {}
  rgb = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
  rgb[0, :8] = [[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]] + [[7] * 3] * 3
  out['rgb'] = rgb
  out['hsv_of_rgb'] = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
  hsv = np.stack(
    [
      rng.integers(0, 180, (40, 37)),
      rng.integers(0, 256, (40, 37)),
      rng.integers(0, 256, (40, 37)),
    ],
    -1,
  ).astype(np.uint8)
  out['hsv'] = hsv
  out['rgb_of_hsv'] = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  source = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
  out['resize_source'] = source
  for h, w in RESIZE_SIZES:
    out[f'resize_{h}x{w}'] = cv2.resize(source, (w, h), interpolation=cv2.INTER_LINEAR)
  for i in range(8):
    image, label = example(i, rng)
    seed = np.array([i, 11], np.int64)
    out[f'chain{i}_image'], out[f'chain{i}_label'], out[f'chain{i}_seed'] = image, label, seed
    out[f'chain{i}_out_image'], out[f'chain{i}_out_label'] = mmseg_chain(image, label, seed)
  np.savez_compressed(OUT, **out)
  print(f'wrote {OUT} ({OUT.stat().st_size} bytes)')


if __name__ == '__main__':
  main()
