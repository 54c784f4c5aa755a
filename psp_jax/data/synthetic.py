"""A synthetic scene-parsing data set in which what an object is depends on its scene.

Four scene types (street, harbour, pasture, beach) and 11 classes; cars and boats (cows and
seals) are drawn alike, so only the scene tells them apart, as in PSPNet's motivation.
Example `index` of a split is a pure function of (seed, split, index, image_size).

  image, label, scene = render(0, 'validation', 22, scene='harbour')

Design: docs/design.md#the-synthetic-data-set
"""

from collections.abc import Iterator

import numpy as np

CLASS_NAMES = (
  'sky',
  'building',
  'tree',
  'road',
  'water',
  'grass',
  'sand',
  'car',
  'boat',
  'cow',
  'seal',
)
SKY, BUILDING, TREE, ROAD, WATER, GRASS, SAND, CAR, BOAT, COW, SEAL = range(len(CLASS_NAMES))
NUM_CLASSES = len(CLASS_NAMES)

SCENES = ('street', 'harbour', 'pasture', 'beach')
# Per scene: (far band class, ground class, object kind, object class).
SCENE_LAYOUT = {
  'street': (BUILDING, ROAD, 'vehicle', CAR),
  'harbour': (BUILDING, WATER, 'vehicle', BOAT),
  'pasture': (TREE, GRASS, 'animal', COW),
  'beach': (WATER, SAND, 'animal', SEAL),
}
# Classes drawn identically and told apart only by the scene around them.
AMBIGUOUS_PAIRS = ((CAR, BOAT), (COW, SEAL))
SPLITS = {'train': 0, 'validation': 1}

_VEHICLE_COLOURS = np.array(
  [[200, 35, 30], [230, 200, 40], [235, 125, 30], [232, 232, 226], [45, 150, 70], [125, 55, 160]],
  np.float32,
)
_ANIMAL_COLOURS = np.array(
  [[228, 226, 218], [132, 86, 52], [48, 42, 40], [150, 148, 140]],
  np.float32,
)
_BUILDING_COLOURS = np.array(
  [[150, 150, 150], [190, 175, 150], [160, 90, 70], [110, 110, 120]],
  np.float32,
)
_NOISE_SIGMA = 6.0


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
  """Bilinearly interpolated value noise, about unit variance, features `cell` pixels wide."""
  gh, gw = int(height / cell) + 2, int(width / cell) + 2
  grid = rng.standard_normal((gh, gw), dtype=np.float32)
  y = np.arange(height, dtype=np.float32) / cell
  x = np.arange(width, dtype=np.float32) / cell
  y0, x0 = y.astype(np.int32), x.astype(np.int32)
  fy, fx = (y - y0)[:, None], (x - x0)[None, :]
  top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
  bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
  return top * (1 - fy) + bottom * fy


def _paint(canvas, label, mask, colour, cls: int | None) -> None:
  """Writes colour ([3] or [H, W, 3]) and class cls into the pixels where mask is True."""
  np.copyto(canvas, colour, where=mask[..., None])
  if cls is not None:
    np.copyto(label, np.uint8(cls), where=mask)


class _Canvas:
  """Pixel grid of one image: coordinates, colours (float 0..255) and labels."""

  def __init__(self, size: int):
    self.size = size
    self.yy, self.xx = np.mgrid[0:size, 0:size].astype(np.float32)
    self.image = np.zeros((size, size, 3), np.float32)
    self.label = np.zeros((size, size), np.uint8)


def _sky(c: _Canvas, rng: np.random.Generator, horizon: float) -> None:
  top = np.array([90, 150, 215], np.float32) + rng.uniform(-15, 15, 3).astype(np.float32)
  low = np.array([185, 210, 235], np.float32) + rng.uniform(-10, 10, 3).astype(np.float32)
  t = np.clip(c.yy[:, :1] / max(horizon, 1.0), 0, 1)[..., None]  # [S, 1, 1]: rows only.
  colour = np.broadcast_to(top * (1 - t) + low * t, c.image.shape).copy()
  for _ in range(rng.integers(0, 4)):
    cx, cy = rng.uniform(0, c.size), rng.uniform(0, horizon)
    rx, ry = rng.uniform(0.08, 0.25) * c.size, rng.uniform(0.03, 0.07) * c.size
    rows = slice(max(int(cy - ry), 0), max(int(cy + ry) + 1, 0))
    cols = slice(max(int(cx - rx), 0), max(int(cx + rx) + 1, 0))
    yy, xx = c.yy[rows, cols], c.xx[rows, cols]
    alpha = np.clip(1 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2, 0, 1)[..., None]
    colour[rows, cols] = colour[rows, cols] * (1 - 0.8 * alpha) + 245 * 0.8 * alpha
  _paint(c.image, c.label, c.yy < horizon, colour, SKY)


def _water(c, rng, mask) -> np.ndarray:
  base = np.array([35, 85, 165], np.float32) + rng.uniform(-12, 12, 3)
  wavelength = rng.uniform(3.0, 5.0)
  phase = rng.uniform(0, 2 * np.pi)
  wobble = 0.6 * np.sin(2 * np.pi * c.xx / rng.uniform(15, 30) + phase)
  ripples = np.sin(2 * np.pi * c.yy / wavelength + wobble)
  shade = 28 * ripples + 10 * _smooth_noise(rng, c.size, c.size, 12)
  return base + shade[..., None] * np.array([0.6, 0.8, 1.0], np.float32)


def _road(c, rng, horizon) -> np.ndarray:
  grey = rng.uniform(85, 110)
  colour = grey + 11 * rng.standard_normal((c.size, c.size), dtype=np.float32)
  colour = np.repeat(colour[..., None], 3, axis=2) + np.array([0, 0, 4], np.float32)
  depth = c.size - horizon
  for frac in rng.uniform(0.25, 0.9, rng.integers(1, 3)):
    y = horizon + frac * depth
    thick = 1 + 2.5 * frac
    period, offset = rng.uniform(14, 24), rng.uniform(0, 24)
    dashes = (np.abs(c.yy - y) < thick) & (((c.xx + offset) % period) < period * 0.55)
    colour[dashes] = 235
  return colour


def _grass(c, rng) -> np.ndarray:
  base = np.array([70, 140, 45], np.float32) + rng.uniform(-12, 12, 3)
  columns = rng.standard_normal(c.size, dtype=np.float32)
  blades = _smooth_noise(rng, c.size, c.size, 3)
  shade = 22 * columns[None, :] * 0.6 + 14 * blades * 0.8
  return base + shade[..., None] * np.array([0.5, 1.0, 0.4], np.float32)


def _sand(c, rng) -> np.ndarray:
  base = np.array([222, 196, 145], np.float32) + rng.uniform(-10, 10, 3)
  dunes = 10 * _smooth_noise(rng, c.size, c.size, 20)
  speckle = 12 * rng.standard_normal((c.size, c.size), dtype=np.float32)
  dots = (rng.random((c.size, c.size)) < 0.02) * -60.0
  return base + (dunes + speckle + dots)[..., None]


def _buildings(c, rng, horizon) -> None:
  bottom = int(np.ceil(horizon))  # Rows >= horizon are ground.
  x = rng.uniform(-0.1, 0) * c.size
  while x < c.size:
    width = rng.uniform(0.1, 0.28) * c.size
    height = rng.uniform(0.08, 0.3) * c.size
    x0, x1 = max(int(np.ceil(x)), 0), min(int(np.ceil(x + width)), c.size)
    y0 = max(int(np.ceil(horizon - height)), 0)
    colour = _BUILDING_COLOURS[rng.integers(len(_BUILDING_COLOURS))] + rng.uniform(-12, 12, 3)
    sx, sy = rng.uniform(4, 7), rng.uniform(5, 8)
    lit = rng.random() < 0.3
    if x1 > x0 and bottom > y0:
      yy, xx = c.yy[y0:bottom, x0:x1], c.xx[y0:bottom, x0:x1]
      windows = (((xx - x) % sx) > sx * 0.5) & (((yy - horizon) % sy) > sy * 0.45)
      window_colour = np.array([225, 210, 140] if lit else [45, 55, 75], np.float32)
      c.image[y0:bottom, x0:x1] = np.where(windows[..., None], window_colour, colour)
      c.label[y0:bottom, x0:x1] = BUILDING
    x += width + rng.uniform(-0.02, 0.04) * c.size


def _trees(c, rng, horizon) -> None:
  base = np.array([38, 88, 36], np.float32) + rng.uniform(-8, 8, 3)
  leaves = 16 * _smooth_noise(rng, c.size, c.size, 2.5)
  colour = base + leaves[..., None] * np.array([0.6, 1.0, 0.5], np.float32)
  crown = np.zeros((c.size, c.size), bool)
  x = rng.uniform(-0.05, 0.05) * c.size
  while x < c.size + 0.05 * c.size:
    r = rng.uniform(0.05, 0.11) * c.size
    top = horizon - rng.uniform(0.06, 0.2) * c.size
    crown |= ((c.xx - x) ** 2 + (c.yy - top) ** 2 < r * r) | (
      (np.abs(c.xx - x) < r) & (c.yy >= top) & (c.yy < horizon)
    )
    x += rng.uniform(0.6, 1.3) * r
  _paint(c.image, c.label, crown, colour, TREE)


def _vehicle(c, rng, cx, bottom, width, min_top) -> tuple[np.ndarray, np.ndarray]:
  """One car/boat, its top at min_top or lower (at min_top if bottom is inf).

  Returns:
    Its mask bool [H, W] and colours float [H, W, 3].
  """
  body_h = width * rng.uniform(0.26, 0.34)
  cab_w, cab_h = width * rng.uniform(0.45, 0.6), width * rng.uniform(0.15, 0.21)
  bottom = max(bottom, min_top + body_h + cab_h) if bottom < np.inf else min_top + body_h + cab_h
  cy = bottom - body_h / 2
  body = (np.abs(c.xx - cx) / (width / 2)) ** 4 + (np.abs(c.yy - cy) / (body_h / 2)) ** 4 <= 1
  cab_x = cx + width * rng.uniform(-0.12, 0.12)
  cab_bottom = bottom - body_h + 1
  rise = np.clip((cab_bottom - c.yy) / cab_h, 0, 1)
  cabin = (c.yy <= cab_bottom) & (rise < 1) & (np.abs(c.xx - cab_x) <= cab_w / 2 * (1 - 0.3 * rise))
  glass = (
    (c.yy <= cab_bottom - 0.2 * cab_h)
    & (c.yy >= cab_bottom - 0.8 * cab_h)
    & (np.abs(c.xx - cab_x) <= cab_w / 2 * (0.82 - 0.3 * rise))
    & (np.abs(c.xx - cab_x) >= 0.04 * cab_w)
  )
  stripe = body & (np.abs(c.yy - (bottom - 0.55 * body_h)) < 0.07 * body_h + 0.5)
  paint = _VEHICLE_COLOURS[rng.integers(len(_VEHICLE_COLOURS))] + rng.uniform(-15, 15, 3)
  shade = 1.12 - 0.3 * np.clip((c.yy - (bottom - body_h - cab_h)) / (body_h + cab_h), 0, 1)
  colour = paint * shade[..., None]
  stripe_colour = np.array([30, 30, 30] if paint.mean() > 140 else [235, 235, 235], np.float32)
  colour = np.where(stripe[..., None], stripe_colour, colour)
  colour = np.where(glass[..., None], np.array([50, 62, 80], np.float32), colour)
  return body | cabin, colour


def _animal(c, rng, cx, bottom, width, min_top) -> tuple[np.ndarray, np.ndarray]:
  """One cow/seal, its top at min_top or lower (at min_top if bottom is inf).

  Returns:
    Its mask bool [H, W] and colours float [H, W, 3].
  """
  body_h = width * rng.uniform(0.34, 0.44)
  rx, ry = 0.4 * width, body_h / 2
  height = 1.6 * ry + 0.1 * width  # The head's top is the highest point.
  bottom = max(bottom, min_top + height) if bottom < np.inf else min_top + height
  bx, by = cx - 0.08 * width * (facing := rng.choice([-1.0, 1.0])), bottom - ry
  body = ((c.xx - bx) / rx) ** 2 + ((c.yy - by) / ry) ** 2 <= 1
  hx, hy = bx + facing * 0.42 * width, bottom - 1.6 * ry
  head = ((c.xx - hx) / (0.14 * width)) ** 2 + ((c.yy - hy) / (0.1 * width)) ** 2 <= 1
  mask = body | head
  order = rng.permutation(len(_ANIMAL_COLOURS))
  coat, spot_colour = _ANIMAL_COLOURS[order[0]], _ANIMAL_COLOURS[order[1]]
  colour = np.broadcast_to(coat + rng.uniform(-12, 12, 3), (c.size, c.size, 3)).copy()
  for _ in range(rng.integers(3, 8)):
    sx, sy = bx + rng.uniform(-0.8, 0.8) * rx, by + rng.uniform(-0.7, 0.7) * ry
    r = rng.uniform(0.06, 0.13) * width
    spot = ((c.xx - sx) ** 2 + (c.yy - sy) ** 2 < r * r) & body
    colour[spot] = spot_colour
  fur = 7 * rng.standard_normal((c.size, c.size), dtype=np.float32)
  eye = (c.xx - (hx + facing * 0.06 * width)) ** 2 + (c.yy - (hy - 0.02 * width)) ** 2 < (
    0.02 * width + 0.6
  ) ** 2
  colour = colour + fur[..., None]
  colour[eye] = 20
  return mask, colour


def _streams(seed: int, split: str, index: int) -> list[np.random.Generator]:
  if split not in SPLITS:
    raise ValueError(f'Unknown synthetic split {split!r}; expected one of {sorted(SPLITS)}.')
  sequence = np.random.SeedSequence([seed, SPLITS[split], index])
  return [np.random.Generator(np.random.PCG64(s)) for s in sequence.spawn(4)]


def render(
  seed: int, split: str, index: int, image_size: int = 129, *, scene: str | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
  """Draws one example.

  Args:
    seed: data set seed.
    split: 'train' or 'validation'.
    index: example number within the split.
    image_size: side of the square image in pixels.
    scene: force this scene type (one of SCENES) instead of the random one; every object
      pixel stays the same within a kind (street/harbour, pasture/beach).

  Returns:
    image uint8 [S, S, 3], label uint8 [S, S] with values in [0, NUM_CLASSES), scene name.
  """
  if image_size < 16:
    raise ValueError(f'synthetic image_size must be >= 16, got {image_size}.')
  layout, stuff, objects, noise = _streams(seed, split, index)
  # The layout stream is drawn the same way for every scene, so forcing a scene changes
  # only the stuff stream's use, never the horizon, the objects or the noise.
  drawn_scene = SCENES[layout.integers(len(SCENES))]
  scene = scene or drawn_scene
  if scene not in SCENE_LAYOUT:
    raise ValueError(f'Unknown scene {scene!r}; expected one of {SCENES}.')
  band, ground, kind, thing = SCENE_LAYOUT[scene]
  size = image_size
  horizon = layout.uniform(0.22, 0.38) * size
  gain, offset = layout.uniform(0.85, 1.15), layout.uniform(-15, 15)

  c = _Canvas(size)
  _sky(c, stuff, horizon)
  if band == BUILDING:
    _buildings(c, stuff, horizon)
  elif band == TREE:
    _trees(c, stuff, horizon)
  else:  # The sea behind a beach.
    sea = (c.yy >= horizon - stuff.uniform(0.06, 0.16) * size) & (c.yy < horizon)
    _paint(c.image, c.label, sea, _water(c, stuff, sea), WATER)
  land = c.yy >= horizon
  texture = {
    ROAD: lambda: _road(c, stuff, horizon),
    WATER: lambda: _water(c, stuff, land),
    GRASS: lambda: _grass(c, stuff),
    SAND: lambda: _sand(c, stuff),
  }[ground]()
  _paint(c.image, c.label, land, texture, ground)

  draw = _vehicle if kind == 'vehicle' else _animal
  count = 1 + objects.choice(3, p=[0.4, 0.35, 0.25])
  placements = []
  for i in range(count):
    if i == 0 and objects.random() < 0.5:
      # A close-up: wider than the view, its top just below the horizon, cut by the bottom
      # edge. Its lower pixels are far from any ground pixel: only a wide view tells car from
      # boat there.
      width, near, cx = objects.uniform(1.3, 1.9), np.inf, objects.uniform(0.35, 0.65)
    elif i == 0:
      width, near, cx = (
        objects.uniform(0.35, 0.7),
        objects.uniform(0.55, 1.0),
        objects.uniform(0.1, 0.9),
      )
    else:
      width, near, cx = (
        objects.uniform(0.1, 0.35),
        objects.uniform(0.1, 0.85),
        objects.uniform(0.05, 0.95),
      )
    bottom = horizon + near * (size - horizon)
    placements.append((bottom, cx * size, width * size))
  # Some ground always shows above the objects: the scene stays decidable.
  min_top = horizon + 0.06 * size
  for bottom, cx, width in sorted(placements):  # Far objects first; near ones occlude them.
    mask, colour = draw(c, objects, cx, bottom, width, min_top)
    _paint(c.image, c.label, mask, colour, thing)

  image = c.image * gain + offset
  image += _NOISE_SIGMA * noise.standard_normal(image.shape, dtype=np.float32)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), c.label, scene


def scene_cues(scene: str) -> tuple[int, ...]:
  """The classes that tell `scene` from the scene whose objects look the same.

  street: road (harbour shares its buildings); harbour: water; pasture: tree and grass;
  beach: water and sand.
  """
  band, ground, kind, _ = SCENE_LAYOUT[scene]
  other = next(v for s, v in SCENE_LAYOUT.items() if v[2] == kind and s != scene)
  return tuple(c for c in (band, ground) if c not in other[:2])


def cue_distances(label: np.ndarray, scene: str) -> np.ndarray:
  """Distance in pixels from each object pixel to the nearest pixel of a scene_cues class.

  Args:
    label: uint8 [H, W] of a scene of type `scene` (render's label).
    scene: its scene type.

  Returns:
    float [number of car/boat/cow/seal pixels], in row-major order; inf where the image
    shows no cue at all.
  """
  from scipy import ndimage  # noqa: PLC0415 (rendering alone does not need it)

  cue = np.isin(label, scene_cues(scene))
  thing = label == SCENE_LAYOUT[scene][3]
  if not cue.any():
    return np.full(int(thing.sum()), np.inf)
  return ndimage.distance_transform_edt(~cue)[thing]


def generate(
  seed: int, split: str, num_examples: int, image_size: int = 129
) -> Iterator[tuple[int, np.ndarray, np.ndarray, str]]:
  """Yields (index, image uint8 [S, S, 3], label uint8 [S, S], scene) for a split."""
  for index in range(num_examples):
    yield (index, *render(seed, split, index, image_size))
