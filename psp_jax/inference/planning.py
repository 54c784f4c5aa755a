"""Host-side planning of tool/test.py (and mmseg's test): resize, padding, window grid.

Pure NumPy on three-channel images and index vectors, so it runs on the host while the
devices compute; psp_jax.inference.sliding_window turns the plans into device work.

  plan = plan_image(image, InferenceConfig(mode='whole'))

Design: docs/design.md#host-planning
"""

import dataclasses
import math

import ml_collections
import numpy as np

from psp_jax import errors, sizes
from psp_jax.data.normalization import MEAN_RGB, STD_RGB

MEAN = np.array(MEAN_RGB, np.float32)  # psp_jax.data.normalization, as arrays
STD = np.array(STD_RGB, np.float32)
RESIZES = ('long_side', 'fit')
AVERAGES = ('probs', 'logits')
# Command-line examples of the InferenceConfig fields that are tuples in a config.
_EXAMPLES = {'scales': "'(1.0,)'", 'fit_scale': "'(2048, 512)'", 'crop_size': '473'}


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
    resize: 'long_side' (tool/test.py: long side round(scale * base_size)) or 'fit'
      (mmseg's Resize keep_ratio: as large as fits fit_scale, see fit_size).
    fit_scale: (long, short) edges the image must fit with resize='fit' (mmseg's
      scale=(2048, 512)); a scale s fits (int(long * s), int(short * s)).
    stride: window stride in pixels (mmseg's test_cfg stride); 0 derives it from
      stride_rate.
    clip_windows: windows are clipped to the image, never padded: an image smaller than the
      crop runs as one window of its own size (mmseg's slide_inference). False pads it with
      the mean colour to the crop (tool/test.py).
    average: 'probs' (tool/test.py: softmax of each window, averaged and resized back) or
      'logits' (mmseg: raw logits averaged and resized back, argmax of those).
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
  resize: str = 'long_side'
  fit_scale: tuple[int, int] = (2048, 512)
  stride: int = 0
  clip_windows: bool = False
  average: str = 'probs'

  def __post_init__(self):
    if self.mode not in ('slide', 'whole'):
      raise ValueError(f"mode must be 'slide' or 'whole', got {self.mode!r}")
    if self.resize not in RESIZES:
      raise ValueError(f'resize must be one of {RESIZES}, got {self.resize!r}')
    if self.average not in AVERAGES:
      raise ValueError(f'average must be one of {AVERAGES}, got {self.average!r}')
    if self.stride < 0:
      raise ValueError(f'stride must be >= 0 (0: from stride_rate), got {self.stride}')
    if self.whole_multiple < 1:
      raise ValueError(f'whole_multiple must be >= 1, got {self.whole_multiple}')
    object.__setattr__(self, 'fit_scale', sizes.pair(self.fit_scale, 'fit_scale'))
    try:
      scales = tuple(float(s) for s in self.scales)
    except (TypeError, ValueError):  # None, or (None,)
      scales = ()
    if not scales or min(scales) <= 0:
      raise ValueError(f'scales must be positive numbers, got {self.scales!r}')
    crop = self.crop_size
    object.__setattr__(self, 'crop_size', sizes.pair(crop, 'crop_size'))
    object.__setattr__(self, 'scales', scales)

  @property
  def strides(self) -> tuple[int, int]:
    """(height, width) window stride: `stride`, or ceil(crop * stride_rate) when it is 0."""
    if self.stride > 0:
      return self.stride, self.stride
    return tuple(math.ceil(c * self.stride_rate) for c in self.crop_size)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, **overrides) -> 'InferenceConfig':
    """Reads config.eval.* and config.data.crop_size; keyword overrides win.

    The one check of those values: training, evaluate and the pre-flight call it at start-up.

    Raises:
      errors.InvalidInputError: naming the config key, for a value that cannot work.
    """
    ev = config.eval
    kwargs = dict(
      mode=ev.mode,
      crop_size=config.data.crop_size,
      base_size=ev.base_size,
      scales=ev.scales,
      flip=ev.flip,
      whole_multiple=ev.whole_multiple,
      tile_size=ev.tile_size,
      resize=ev.resize,
      fit_scale=ev.fit_scale,
      stride=ev.stride,
      clip_windows=ev.clip_windows,
      average=ev.average,
    )
    kwargs.update(overrides)
    try:
      return cls(**kwargs)
    except ValueError as e:  # Each message starts with the field's name.
      field = str(e).split(' ', 1)[0]
      key = 'config.data.crop_size' if field == 'crop_size' else f'config.eval.{field}'
      example = _EXAMPLES.get(field)
      hint = f' (on the command line e.g. --{key}={example})' if example else ''
      raise errors.InvalidInputError(f'{key}: {e}{hint}') from None


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


def fit_size(height: int, width: int, scale: float, fit_scale: tuple[int, int]) -> tuple[int, int]:
  """Size of the image resized to fit fit_scale at `scale`, aspect kept (mmcv imrescale).

  mmseg's Resize(scale=fit_scale, keep_ratio=True): with long, short = the larger and smaller
  of int(edge * scale), factor = min(long / max(h, w), short / min(h, w)) and each side
  becomes int(side * factor + 0.5), in double precision.
  """
  edges = [int(e * scale) for e in fit_scale]
  long, short = max(edges), min(edges)
  factor = min(long / max(height, width), short / min(height, width))
  return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resized_size(height: int, width: int, scale: float, procedure: 'InferenceConfig'):
  """(new_h, new_w) of an image at `scale` under procedure.resize."""
  if procedure.resize == 'fit':
    return fit_size(height, width, scale, procedure.fit_scale)
  return scaled_size(height, width, scale, procedure.base_size)


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


def _cv2_taps(in_size: int, out_size: int, clamp: bool):
  """cv2.resize INTER_LINEAR's uint8 taps along one axis: (i0, i1, w0, w1), weights / 2048.

  Source position float32((d + 0.5) * (1 / (out / in)) - 0.5); along x (clamp) a position
  outside the image takes the border pixel whole, along y only the rows are clamped.
  """
  f = ((np.arange(out_size) + 0.5) * (1.0 / (out_size / in_size)) - 0.5).astype(np.float32)
  s = np.floor(f)
  f = (f - s).astype(np.float32)
  s = s.astype(np.int64)
  if clamp:
    f = np.where((s < 0) | (s >= in_size - 1), np.float32(0), f)
    s = np.clip(s, 0, in_size - 1)
  w1 = np.rint(f * np.float32(2048)).astype(np.int64)
  w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int64)
  return np.clip(s, 0, in_size - 1), np.clip(s + 1, 0, in_size - 1), w0, w1


def resize_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """cv2.resize(image, (width, height), INTER_LINEAR) of a uint8 image, bit for bit.

  What mmcv's Resize computes (mmseg's test resize): OpenCV's fixed point, a horizontal
  integer pass, then the vertical pass as its SIMD code rounds it (OpenCV 4.10, x86).
  psp_jax.data.mmseg_augment.resize_window is the same in TensorFlow.

  Returns:
    uint8 [height, width, C].
  """
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
  if image.shape[:2] == (height, width):  # Weights 2048 and 0 everywhere: the image itself.
    return image.copy()
  r0, r1, b0, b1 = _cv2_taps(image.shape[0], height, clamp=False)
  c0, c1, a0, a1 = _cv2_taps(image.shape[1], width, clamp=True)
  rows = image.astype(np.int64)
  rows = rows[:, c0] * a0[None, :, None] + rows[:, c1] * a1[None, :, None]
  v = ((rows[r0] >> 4) * b0[:, None, None] >> 16) + ((rows[r1] >> 4) * b1[:, None, None] >> 16)
  return np.clip((v + 2) >> 2, 0, 255).astype(np.uint8)


def window_grid(
  height: int,
  width: int,
  crop: tuple[int, int],
  stride_rate: float = 2 / 3,
  stride: tuple[int, int] | None = None,
):
  """Padding and window offsets of tool/test.py scale_process.

  For an image at least as large as the crop this is also mmseg's slide_inference grid:
  ceil((size - crop) / stride) + 1 windows a side, the last one moved back to end at the
  border.

  Args:
    height, width: the image.
    crop: window (height, width).
    stride_rate: stride as a fraction of the crop (rounded up), unless `stride` is given.
    stride: (height, width) stride in pixels.

  Returns:
    (pad_top, pad_left), (padded_h, padded_w), offsets int32 [G, 2] (top, left).
  """
  crop_h, crop_w = crop
  pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
  # The image sits in the middle of the mean padding (int(pad / 2) above / left).
  pad_top, pad_left = pad_h // 2, pad_w // 2
  new_h, new_w = height + pad_h, width + pad_w
  if stride is None:
    stride = (math.ceil(crop_h * stride_rate), math.ceil(crop_w * stride_rate))
  stride_h, stride_w = stride
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


def _canvas_and_crop(new_h: int, new_w: int, scale: float, procedure: InferenceConfig):
  """Canvas shape, window shape and the most windows any image of this canvas has.

  The canvas depends on the scale (and with resize='fit' on the orientation) only, so one
  compilation serves every image; the window is the crop (clipped to the image with
  clip_windows), or in whole mode the image padded to a multiple of whole_multiple.
  """
  if procedure.mode == 'whole':
    m = procedure.whole_multiple
    crop = (-(-new_h // m) * m, -(-new_w // m) * m)
    return crop, crop, 1
  crop = procedure.crop_size
  if procedure.clip_windows:
    crop = (min(crop[0], new_h), min(crop[1], new_w))
  if procedure.resize == 'fit':
    # Every resized image fits (short, long) or (long, short), as it is wide or tall.
    edges = [int(e * scale) for e in procedure.fit_scale]
    long, short = max(edges), min(edges)
    bound = (short, long) if new_w >= new_h else (long, short)
  else:
    # Every image at this scale fits a long_size square.
    long_size = round(scale * procedure.base_size)
    bound = (long_size, long_size)
  canvas_hw = (max(bound[0], crop[0]), max(bound[1], crop[1]))
  max_windows = len(window_grid(*canvas_hw, crop, stride=procedure.strides)[2])
  return canvas_hw, crop, max_windows


def plan_image(image: np.ndarray, procedure: InferenceConfig) -> ImagePlan:
  """Resizes, pads and normalises `image` (uint8 or float [H, W, 3], RGB) for every scale."""
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'expected an RGB image [H, W, 3], got shape {image.shape}')
  height, width = image.shape[:2]
  source, image = image, image.astype(np.float32)
  plans = []
  for scale in procedure.scales:
    new_h, new_w = resized_size(height, width, scale, procedure)
    if procedure.resize == 'fit':  # mmcv resizes the uint8 image with cv2: uint8 again.
      resized = resize_uint8(source, new_h, new_w).astype(np.float32)
    else:
      resized = resize_bilinear(image, new_h, new_w)
    canvas_hw, crop, max_windows = _canvas_and_crop(new_h, new_w, scale, procedure)
    (top, left), _, offsets = window_grid(new_h, new_w, crop, stride=procedure.strides)
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
