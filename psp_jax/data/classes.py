"""Class names, colour palettes and label tables of the supported data sets (data, not code).

`CLASS_NAMES[name]` is a tuple of K names and `PALETTES[name]` a uint8 [K, 3] array for
'ade20k' (150), 'voc2012' (21), 'cityscapes' (19 train ids) and 'synthetic' (11). The
ADE20K and Cityscapes tables live in classes.json next to this file.
"""

import json
import pathlib

import numpy as np

from psp_jax.data import synthetic

_TABLES = json.loads((pathlib.Path(__file__).parent / 'classes.json').read_text())


def _voc_palette(count: int = 256) -> np.ndarray:
  """The PASCAL VOC devkit colormap (VOClabelcolormap.m): bits of the index spread over RGB."""
  palette = np.zeros((count, 3), np.uint8)
  for index in range(count):
    value, r, g, b = index, 0, 0, 0
    for shift in range(7, -1, -1):
      r |= (value & 1) << shift
      g |= ((value >> 1) & 1) << shift
      b |= ((value >> 2) & 1) << shift
      value >>= 3
    palette[index] = (r, g, b)
  return palette


_SYNTHETIC_PALETTE = (
  (70, 130, 180),  # sky
  (70, 70, 70),  # building
  (30, 100, 30),  # tree
  (128, 64, 128),  # road
  (0, 80, 255),  # water
  (120, 200, 50),  # grass
  (240, 220, 160),  # sand
  (0, 0, 142),  # car
  (0, 200, 200),  # boat
  (150, 80, 30),  # cow
  (220, 20, 60),  # seal
)

CLASS_NAMES: dict[str, tuple[str, ...]] = {
  'ade20k': tuple(_TABLES['ade20k']['names']),
  'voc2012': tuple(_TABLES['voc2012']['names']),
  'cityscapes': tuple(_TABLES['cityscapes']['names']),
  'synthetic': synthetic.CLASS_NAMES,
}

PALETTES: dict[str, np.ndarray] = {
  'ade20k': np.array(_TABLES['ade20k']['palette'], np.uint8),
  'voc2012': _voc_palette(21),
  'cityscapes': np.array(_TABLES['cityscapes']['palette'], np.uint8),
  'synthetic': np.array(_SYNTHETIC_PALETTE, np.uint8),
}

# Cityscapes label id (the value in *_gtFine_labelIds.png, 0..33) -> train id (0..18, 255 for
# classes not evaluated), from cityscapesScripts helpers/labels.py.
CITYSCAPES_TRAIN_IDS: tuple[int, ...] = tuple(t for _, _, t in _TABLES['cityscapes']['label_ids'])
CITYSCAPES_LABEL_NAMES: tuple[str, ...] = tuple(n for _, n, _ in _TABLES['cityscapes']['label_ids'])

# VOC palette PNGs colour 255 (boundaries, ignored) cream; keep that entry for rendering them.
VOC_PALETTE_256: np.ndarray = _voc_palette(256)


def names(dataset: str | None, num_classes: int) -> tuple[str, ...]:
  """The data set's class names, or 'class 0', 'class 1', ... for an unknown one."""
  known = CLASS_NAMES.get(dataset)
  if known is not None and len(known) == num_classes:
    return known
  return tuple(f'class {i}' for i in range(num_classes))


def palette(dataset: str | None, num_classes: int) -> np.ndarray:
  """uint8 [num_classes, 3] colours: the data set's palette, else the VOC colormap (then a
  fixed random draw past 256), so an unknown data set looks the same everywhere."""
  known = PALETTES.get(dataset)
  if known is not None and len(known) == num_classes:
    return known
  extra = np.random.default_rng(0).integers(0, 256, (max(num_classes - 256, 0), 3))
  return np.concatenate([VOC_PALETTE_256, extra.astype(np.uint8)])[:num_classes]
