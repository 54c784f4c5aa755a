"""Host-side planning of tool/test.py: resize to each scale, mean padding, window grid.

Pure NumPy on three-channel images and index vectors, so it runs on the host while the
devices compute; psp_jax.inference.sliding_window turns the plans into device work.

Why the image resize is NumPy, on the host: images differ in size, so a JAX resize would
compile once per size, and TF would make predict depend on TensorFlow; three channels cost
little. The resize of the K-channel probabilities back to the original size runs on device
(sliding_window.py), as gathers with the index vectors computed here, so its shapes stay
fixed. Both follow cv2.resize INTER_LINEAR (align_corners=False), which tool/test.py uses.
"""

import dataclasses
import math

import ml_collections
import numpy as np

from psp_jax import sizes
from psp_jax.data.normalization import MEAN_RGB, STD_RGB

MEAN = np.array(MEAN_RGB, np.float32)  # psp_jax.data.normalization, as arrays
STD = np.array(STD_RGB, np.float32)


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
  """How tool/test.py turns an image into a label map (defaults: ADE20K single scale).

  Attributes:
    mode: 'slide' (the official sliding window) or 'whole' (one forward per image).
    crop_size: window (height, width); test_h / test_w in the official yaml.
    base_size: long side of the image at scale 1.0; base_size in the yaml.
    scales: resize factors whose probabilities are averaged; scales in the yaml.
    flip: average each window's softmax with that of its horizontal flip (net_process).
    stride_rate: window stride as a fraction of the crop (scale_process: 2/3).
    whole_multiple: in whole mode, images are padded to multiples of this (size buckets).
    windows_per_step: windows per device per forward pass (twice that with the flip).
    tile_size: side of the original-size tiles the resize back runs on.
  """

  mode: str = 'slide'
  crop_size: tuple[int, int] = (473, 473)
  base_size: int = 512
  scales: tuple[float, ...] = (1.0,)
  flip: bool = True
  stride_rate: float = 2 / 3
  whole_multiple: int = 64
  windows_per_step: int = 1
  tile_size: int = 512

  def __post_init__(self):
    if self.mode not in ('slide', 'whole'):
      raise ValueError(f"mode must be 'slide' or 'whole', got {self.mode!r}")
    if not self.scales or min(self.scales) <= 0:
      raise ValueError(f'scales must be positive, got {self.scales}')
    crop = self.crop_size
    object.__setattr__(self, 'crop_size', sizes.pair(crop, 'crop_size'))
    object.__setattr__(self, 'scales', tuple(float(s) for s in self.scales))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **overrides) -> 'InferenceConfig':
    """Reads config.eval.* and config.data.crop_size; keyword overrides win."""
    ev = config.eval
    kwargs = dict(
      mode=ev.mode,
      crop_size=config.data.crop_size,
      base_size=ev.base_size,
      scales=tuple(ev.scales),
      flip=ev.flip,
      whole_multiple=ev.get('whole_multiple', 64),
      tile_size=ev.get('tile_size', 512),
    )
    kwargs.update(overrides)
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------
# Host-side planning (NumPy).


def scaled_size(height: int, width: int, scale: float, base_size: int) -> tuple[int, int]:
  """Size of the image at `scale`: long side round(scale * base_size), aspect kept.

  Mirrors tool/test.py test(): Python's round (half to even) on both sides.
  """
  long_size = round(scale * base_size)
  if height > width:
    return long_size, max(1, round(long_size / float(height) * width))
  return max(1, round(long_size / float(width) * height)), long_size


def linear_indices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source rows and weights of a bilinear resize along one axis.

  cv2.resize INTER_LINEAR (= torch bilinear with align_corners=False): pixel centres at
  +0.5, source positions clamped to the border, no antialiasing when shrinking. (cv2 turns
  an exact 2x shrink into INTER_AREA, which gives the same 2-tap average.)

  Returns:
    i0, i1: int32 [out_size] source indices; frac: float32 [out_size], out = (1-f)*i0 + f*i1.
  """
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  src = np.clip(src, 0.0, in_size - 1)
  i0 = np.floor(src).astype(np.int32)
  frac = (src - i0).astype(np.float32)
  i1 = np.minimum(i0 + 1, in_size - 1).astype(np.int32)
  return i0, i1, frac


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """cv2.resize(image, (width, height), INTER_LINEAR) of a float image [H, W, C] (NumPy)."""
  image = np.asarray(image, np.float32)
  c0, c1, cf = linear_indices(image.shape[1], width)
  # Horizontal pass first, then vertical, as cv2's resize does.
  image = image[:, c0] * (1 - cf)[None, :, None] + image[:, c1] * cf[None, :, None]
  r0, r1, rf = linear_indices(image.shape[0], height)
  return image[r0] * (1 - rf)[:, None, None] + image[r1] * rf[:, None, None]


def window_grid(height: int, width: int, crop: tuple[int, int], stride_rate: float):
  """Padding and window offsets of tool/test.py scale_process.

  Returns:
    (pad_top, pad_left), (padded_h, padded_w), offsets int32 [G, 2] (top, left).
  """
  crop_h, crop_w = crop
  pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
  # The image sits in the middle of the mean padding (int(pad / 2) above / left).
  pad_top, pad_left = pad_h // 2, pad_w // 2
  new_h, new_w = height + pad_h, width + pad_w
  stride_h, stride_w = math.ceil(crop_h * stride_rate), math.ceil(crop_w * stride_rate)
  grid_h = math.ceil((new_h - crop_h) / stride_h) + 1
  grid_w = math.ceil((new_w - crop_w) / stride_w) + 1
  offsets = []
  for gy in range(grid_h):
    # The last window is shifted back inside the image (s_h = e_h - crop_h).
    top = min(gy * stride_h + crop_h, new_h) - crop_h
    for gx in range(grid_w):
      offsets.append((top, min(gx * stride_w + crop_w, new_w) - crop_w))
  return (pad_top, pad_left), (new_h, new_w), np.array(offsets, np.int32).reshape(-1, 2)


@dataclasses.dataclass
class ScalePlan:
  """One scale of one image: the padded, normalised canvas and where to read it back."""

  canvas: np.ndarray  # float32 [Ch, Cw, 3]
  crop: tuple[int, int]
  offsets: np.ndarray  # int32 [G, 2], G fixed per canvas shape; the first num_windows used
  num_windows: int
  rows: tuple[np.ndarray, np.ndarray, np.ndarray]  # canvas rows for each original row
  cols: tuple[np.ndarray, np.ndarray, np.ndarray]  # canvas columns for each original column


@dataclasses.dataclass
class ImagePlan:
  """All scales of one image; images with equal `key` run in one step."""

  height: int
  width: int
  scales: list[ScalePlan]

  @property
  def key(self) -> tuple:
    return tuple((s.canvas.shape[:2], s.crop, len(s.offsets)) for s in self.scales)


def plan_image(image: np.ndarray, config: InferenceConfig) -> ImagePlan:
  """Resizes, pads and normalises `image` (uint8 or float [H, W, 3], RGB) for every scale."""
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'expected an RGB image [H, W, 3], got shape {image.shape}')
  height, width = image.shape[:2]
  image = image.astype(np.float32)
  plans = []
  for scale in config.scales:
    new_h, new_w = scaled_size(height, width, scale, config.base_size)
    resized = resize_bilinear(image, new_h, new_w)
    long_size = round(scale * config.base_size)
    if config.mode == 'slide':
      crop = config.crop_size
      # Every image at this scale fits a long_size square: one canvas shape per scale.
      canvas_hw = (max(long_size, crop[0]), max(long_size, crop[1]))
      max_windows = len(window_grid(*canvas_hw, crop, config.stride_rate)[2])
    else:
      m = config.whole_multiple
      crop = (-(-new_h // m) * m, -(-new_w // m) * m)
      canvas_hw, max_windows = crop, 1
    (top, left), _, offsets = window_grid(new_h, new_w, crop, config.stride_rate)
    # Mean padding (cv2.copyMakeBorder value=mean) is 0 once normalised, as is the rest of
    # the canvas, which no window reads.
    canvas = np.zeros((*canvas_hw, 3), np.float32)
    canvas[top : top + new_h, left : left + new_w] = (resized - MEAN) / STD
    padded = np.zeros((max_windows, 2), np.int32)
    padded[: len(offsets)] = offsets
    r0, r1, rf = linear_indices(new_h, height)
    c0, c1, cf = linear_indices(new_w, width)
    plans.append(
      ScalePlan(
        canvas=canvas,
        crop=crop,
        offsets=padded,
        num_windows=len(offsets),
        rows=(r0 + top, r1 + top, rf),
        cols=(c0 + left, c1 + left, cf),
      )
    )
  return ImagePlan(height, width, plans)
