"""Pictures of label maps: palette colours, overlays with a legend, side-by-side panels.

NumPy and PIL only, so notebooks, psp_jax.predict and TensorBoard summaries share them.
"""

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IGNORE_COLOR = (0, 0, 0)


def colorize(
  labels: np.ndarray,
  palette: np.ndarray,
  *,
  ignore_label: int = 255,
  ignore_color: Sequence[int] = IGNORE_COLOR,
) -> np.ndarray:
  """Colours a label map with a palette (tool/test.py colorize, as RGB instead of mode 'P').

  Args:
    labels: int [H, W] class indices; `ignore_label` pixels get `ignore_color`.
    palette: uint8 [K, 3] colour of each class.

  Returns:
    uint8 [H, W, 3].
  """
  labels = np.asarray(labels)
  palette = np.asarray(palette, np.uint8)
  if palette.ndim != 2 or palette.shape[1] != 3:
    raise ValueError(f'palette must be [K, 3], got shape {palette.shape}')
  ignored = labels == ignore_label
  bad = (~ignored) & ((labels < 0) | (labels >= len(palette)))
  if bad.any():
    raise ValueError(
      f'label values {np.unique(labels[bad])[:10].tolist()} outside the palette of '
      f'{len(palette)} classes (and not the ignore label {ignore_label})'
    )
  rgb = palette[np.where(ignored, 0, labels)]
  rgb[ignored] = np.asarray(ignore_color, np.uint8)
  return rgb


def overlay(
  image: np.ndarray,
  labels: np.ndarray,
  palette: np.ndarray,
  *,
  alpha: float = 0.5,
  ignore_label: int = 255,
) -> np.ndarray:
  """Blends the label colours over an image; ignored pixels show the image unchanged.

  Args:
    image: uint8 [H, W, 3] RGB.
    labels: int [H, W].
    palette: uint8 [K, 3].
    alpha: weight of the label colour.

  Returns:
    uint8 [H, W, 3].
  """
  image = np.asarray(image)
  if image.shape[:2] != np.shape(labels):
    raise ValueError(f'image {image.shape[:2]} and labels {np.shape(labels)} differ in size')
  colors = colorize(labels, palette, ignore_label=ignore_label).astype(np.float32)
  blend = (1 - alpha) * image.astype(np.float32) + alpha * colors
  blend = np.where((np.asarray(labels) == ignore_label)[..., None], image, blend)
  return np.clip(np.round(blend), 0, 255).astype(np.uint8)


def present_classes(labels: np.ndarray, num_classes: int, ignore_label: int = 255) -> list[int]:
  """Classes found in `labels`, largest area first."""
  labels = np.asarray(labels)
  counts = np.bincount(labels[labels != ignore_label].ravel(), minlength=num_classes)
  order = np.argsort(-counts, kind='stable')
  return [int(c) for c in order if counts[c] > 0]


def legend(
  classes: Sequence[int],
  palette: np.ndarray,
  class_names: Sequence[str],
  *,
  height: int,
  font_size: int = 14,
  max_entries: int | None = None,
) -> Image.Image:
  """A white panel listing `classes` with their colour swatch and name, top to bottom.

  Entries that do not fit in `height` (or beyond max_entries) are summarised as '+N more'.
  """
  font = ImageFont.load_default(size=font_size)
  line = font_size + 6
  fits = max(1, (height - 8) // line)
  shown = list(classes)[: min(fits, max_entries or fits)]
  if len(shown) < len(classes) and len(shown) == fits:
    shown = shown[:-1]  # Room for the '+N more' line.
  names = [f'{c} {class_names[c]}' if c < len(class_names) else str(c) for c in shown]
  width = 16 + font_size + max([int(font.getlength(n)) for n in names] + [60])
  panel = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(panel)
  for row, (c, name) in enumerate(zip(shown, names, strict=True)):
    top = 4 + row * line
    swatch = (4, top + 2, 4 + font_size, top + 2 + font_size)
    draw.rectangle(swatch, fill=tuple(int(v) for v in palette[c]), outline=(0, 0, 0))
    draw.text((10 + font_size, top), name, fill=(0, 0, 0), font=font)
  if len(shown) < len(classes):
    more = f'+{len(classes) - len(shown)} more'
    draw.text((4, 4 + len(shown) * line), more, fill=(0, 0, 0), font=font)
  return panel


def overlay_with_legend(
  image: np.ndarray,
  labels: np.ndarray,
  palette: np.ndarray,
  class_names: Sequence[str],
  *,
  alpha: float = 0.5,
  ignore_label: int = 255,
  max_entries: int = 30,
) -> Image.Image:
  """The overlay with, on its right, a legend of the classes present (largest first).

  Args:
    image: uint8 [H, W, 3]; labels: int [H, W]; palette: uint8 [K, 3].
    max_entries: classes listed at most; the rest are counted as '+N more'.

  Returns:
    RGB PIL image, W + legend width wide, at least H high (taller if the legend needs it).
  """
  blended = Image.fromarray(overlay(image, labels, palette, alpha=alpha, ignore_label=ignore_label))
  font_size = int(np.clip(blended.height // 30, 10, 18))
  classes = present_classes(labels, len(palette), ignore_label)
  # Below the image if need be, room for up to max_entries classes (and a '+N more' line).
  rows = min(len(classes), max_entries + 1)
  height = max(blended.height, 8 + rows * (font_size + 6))
  panel = legend(
    classes, palette, class_names, height=height, font_size=font_size, max_entries=max_entries
  )
  canvas = Image.new('RGB', (blended.width + panel.width, height), (255, 255, 255))
  canvas.paste(blended, (0, 0))
  canvas.paste(panel, (blended.width, 0))
  return canvas


def side_by_side(panels: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
  """Puts images [H, W_i, 3] of one height in a row, white gaps between (e.g. for
  TensorBoard: image | prediction | ground truth).

  Returns:
    uint8 [H, sum(W_i) + gap * (len - 1), 3].
  """
  heights = {np.shape(p)[0] for p in panels}
  if len(heights) != 1:
    raise ValueError(f'panels differ in height: {sorted(heights)}')
  spacer = np.full((heights.pop(), gap, 3), 255, np.uint8)
  row = []
  for i, panel in enumerate(panels):
    row += ([spacer] if i else []) + [np.asarray(panel, np.uint8)]
  return np.concatenate(row, axis=1)
