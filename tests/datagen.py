"""Writers of small fake data trees in the real on-disk layouts, for the data tests.

Every example has its own image size (height 16 + i, width 24 + 2 * i over a split), so a
test can tell examples apart by shape alone. Each writer returns {split: {(H, W): (image
path, raw label uint8 [H, W])}}; images are JPEG (PNG for Cityscapes) as the real sets.
"""

import io
import pathlib
import zipfile

import numpy as np
from PIL import Image

from psp_jax.data import classes

Expected = dict[str, dict[tuple[int, int], tuple[pathlib.Path, np.ndarray]]]


def _shape(i: int) -> tuple[int, int]:
  return 16 + i, 24 + 2 * i


def _image(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
  return rng.integers(0, 256, (*shape, 3), dtype=np.uint8)


def _label(rng: np.random.Generator, shape: tuple[int, int], values) -> np.ndarray:
  values = np.asarray(values, np.uint8)
  label = values[rng.integers(0, len(values), shape)]
  label.flat[: len(values)] = values  # Every value occurs at least once.
  return label


def save(path: pathlib.Path, array: np.ndarray, *, palette: np.ndarray | None = None) -> None:
  """Writes an array as JPEG (.jpg) or PNG; with palette, a palette ('P') PNG."""
  path.parent.mkdir(parents=True, exist_ok=True)
  if palette is None:
    image = Image.fromarray(array)
  else:  # The array holds the indices; the palette gives their colours.
    image = Image.frombytes('P', array.shape[::-1], array.astype(np.uint8).tobytes())
    image.putpalette(palette.astype(np.uint8).ravel().tolist())
  if path.suffix == '.jpg':
    image.save(path, format='JPEG', quality=90)
  else:
    image.save(path, format='PNG')


def zip_folder(folder: pathlib.Path, archive: pathlib.Path, prefix: str = '') -> None:
  """Zips every file under folder as prefix + its path relative to folder.parent."""
  with zipfile.ZipFile(archive, 'w') as z:
    for path in sorted(folder.rglob('*')):
      if path.is_file():
        z.write(path, prefix + path.relative_to(folder.parent).as_posix())


def write_ade20k(
  manual_dir: pathlib.Path, counts=(5, 3), *, as_zip: bool = False, seed: int = 0
) -> Expected:
  """ADEChallengeData2016/{images,annotations}/{training,validation}/ (or its zip)."""
  rng = np.random.default_rng(seed)
  root = manual_dir / 'ADEChallengeData2016'
  expected = {}
  for (split, folder), count in zip(
    (('train', 'training'), ('validation', 'validation')), counts, strict=True
  ):
    expected[split] = {}
    for i in range(count):
      shape = _shape(i if split == 'train' else 20 + i)
      stem = f'ADE_{folder[:5]}_{i + 1:08d}'
      image_path = root / 'images' / folder / f'{stem}.jpg'
      save(image_path, _image(rng, shape))
      label = _label(rng, shape, [0, 1, 2, 75, 149, 150])
      save(root / 'annotations' / folder / f'{stem}.png', label)
      expected[split][shape] = (image_path, label)
  (root / 'objectInfo150.txt').write_text('Idx\tRatio\tTrain\tVal\tName\n')
  if as_zip:
    zip_folder(root, manual_dir / 'ADEChallengeData2016.zip')
    with zipfile.ZipFile(manual_dir / 'ADEChallengeData2016.zip', 'a') as z:  # macOS litter.
      z.writestr('__MACOSX/ADEChallengeData2016/images/training/._ADE_train_00000001.jpg', b'x')
    expected = _read_into_memory(expected)
    _remove(root)
  return expected


def write_voc2012(
  manual_dir: pathlib.Path, counts=(4, 3), *, train_list: bool = False, seed: int = 0
) -> Expected:
  """VOCdevkit/VOC2012/ with JPEGImages, SegmentationClass (palette PNGs), val.txt and
  SegmentationClassAug (grayscale PNGs) for train and val ids (as the real SBD set)."""
  rng = np.random.default_rng(seed)
  root = manual_dir / 'VOCdevkit' / 'VOC2012'
  ids = {'train': [f'2008_{i:06d}' for i in range(counts[0])]}
  ids['validation'] = [f'2007_{i:06d}' for i in range(counts[1])]
  expected = {'train': {}, 'validation': {}}
  for n, (split, split_ids) in enumerate(ids.items()):
    for i, image_id in enumerate(split_ids):
      shape = _shape(i + 20 * n)
      save(root / 'JPEGImages' / f'{image_id}.jpg', _image(rng, shape))
      label = _label(rng, shape, [0, 1, 7, 15, 20, 255])
      save(root / 'SegmentationClassAug' / f'{image_id}.png', label)
      if split == 'validation':
        save(root / 'SegmentationClass' / f'{image_id}.png', label, palette=classes.VOC_PALETTE_256)
      expected[split][shape] = (root / 'JPEGImages' / f'{image_id}.jpg', label)
  # An image in JPEGImages outside both lists (VOC has many) must not be read.
  save(root / 'JPEGImages' / '2012_999999.jpg', _image(rng, _shape(50)))
  lists = root / 'ImageSets' / 'Segmentation'
  lists.mkdir(parents=True, exist_ok=True)
  (lists / 'val.txt').write_text(''.join(f'{i}\n' for i in ids['validation']))
  if train_list:  # semseg's list format: image path and label path.
    (lists / 'train_aug.txt').write_text(
      ''.join(f'JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n' for i in ids['train'])
    )
  return expected


CITYSCAPES_IDS = list(range(34))


def write_cityscapes(
  manual_dir: pathlib.Path, counts=(4, 2), *, as_zip: bool = False, seed: int = 0
) -> Expected:
  """leftImg8bit/{train,val}/<city>/ and gtFine/... (or the two official zips)."""
  rng = np.random.default_rng(seed)
  expected = {'train': {}, 'validation': {}}
  for n, (split, folder) in enumerate((('train', 'train'), ('validation', 'val'))):
    for i in range(counts[n]):
      city = ('aachen', 'bremen')[i % 2] if split == 'train' else 'lindau'
      shape = _shape(i + 20 * n)
      stem = f'{city}_{i:06d}_000019'
      image_path = manual_dir / 'leftImg8bit' / folder / city / f'{stem}_leftImg8bit.png'
      save(image_path, _image(rng, shape))
      label = _label(rng, shape, CITYSCAPES_IDS)
      gt = manual_dir / 'gtFine' / folder / city
      save(gt / f'{stem}_gtFine_labelIds.png', label)
      save(gt / f'{stem}_gtFine_color.png', _image(rng, shape))  # Must be ignored.
      expected[split][shape] = (image_path, label)
  if as_zip:
    zip_folder(manual_dir / 'leftImg8bit', manual_dir / 'leftImg8bit_trainvaltest.zip')
    zip_folder(manual_dir / 'gtFine', manual_dir / 'gtFine_trainvaltest.zip')
    expected = _read_into_memory(expected)
    _remove(manual_dir / 'leftImg8bit')
    _remove(manual_dir / 'gtFine')
  return expected


def write_folder(
  root: pathlib.Path, split: str, count: int, num_classes: int, *, seed: int = 0
) -> Expected:
  """root/images/<split>/*.jpg + root/labels/<split>/*.png (nested one level for half)."""
  rng = np.random.default_rng(seed)
  expected = {split: {}}
  for i in range(count):
    shape = _shape(i)
    sub = 'a/' if i % 2 else ''
    image_path = root / 'images' / split / f'{sub}img_{i:03d}.jpg'
    save(image_path, _image(rng, shape))
    label = _label(rng, shape, [*range(num_classes), 255])
    save(root / 'labels' / split / f'{sub}img_{i:03d}.png', label)
    expected[split][shape] = (image_path, label)
  return expected


def write_list(
  root: pathlib.Path, name: str, count: int, num_classes: int, *, seed: int = 0
) -> Expected:
  """Files under root/data/ and the semseg list file root/list/<name>.txt of them."""
  rng = np.random.default_rng(seed)
  expected = {name: {}}
  lines = []
  for i in range(count):
    shape = _shape(i)
    image_path = root / 'data' / 'img' / f'{name}_{i:03d}.jpg'
    save(image_path, _image(rng, shape))
    label = _label(rng, shape, [*range(num_classes), 255])
    save(root / 'data' / 'gt' / f'{name}_{i:03d}.png', label)
    lines.append(f'data/img/{name}_{i:03d}.jpg data/gt/{name}_{i:03d}.png\n')
    expected[name][shape] = (image_path, label)
  (root / 'list').mkdir(parents=True, exist_ok=True)
  (root / 'list' / f'{name}.txt').write_text(''.join(lines))
  return expected


def decode(path_or_bytes) -> np.ndarray:
  """PIL's RGB decoding of an image file (the reference the sources must match)."""
  data = (
    path_or_bytes if isinstance(path_or_bytes, bytes) else pathlib.Path(path_or_bytes).read_bytes()
  )
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def _read_into_memory(expected: Expected) -> Expected:
  return {
    split: {shape: (path.read_bytes(), label) for shape, (path, label) in items.items()}
    for split, items in expected.items()
  }


def _remove(folder: pathlib.Path) -> None:
  for path in sorted(folder.rglob('*'), reverse=True):
    path.unlink() if path.is_file() else path.rmdir()
  folder.rmdir()
