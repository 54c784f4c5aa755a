"""TFDS builder of PASCAL VOC 2012 segmentation with the SBD "aug" labels (train_aug / val)."""

import logging
import os
import pathlib

from psp_jax.data import datasets, files
from psp_jax.data.builders import common

EXPECTED = (
  'the VOC2012 folder (the manual directory itself, VOC2012/ or VOCdevkit/VOC2012/, extracted '
  'from VOCtrainval_11-May-2012.tar; the tar itself is not read) with JPEGImages/*.jpg, '
  'SegmentationClass/*.png and ImageSets/Segmentation/val.txt, plus SegmentationClassAug/*.png '
  '(the SBD-converted labels, inside that folder or next to it); the train_aug ids are read '
  'from ImageSets/Segmentation/train_aug.txt (or train_aug.txt / list/train_aug.txt) when '
  'present, else all SegmentationClassAug labels not in val.txt'
)


def _first_existing(candidates: list[pathlib.Path]) -> pathlib.Path | None:
  return next((p for p in candidates if p.exists()), None)


def read_ids(path: pathlib.Path) -> list[str]:
  """Ids of a VOC list file: one id a line, or semseg's `image_path label_path` lines."""
  ids = []
  for line in path.read_text().splitlines():
    parts = line.split()
    if parts:
      ids.append(pathlib.PurePosixPath(parts[0]).stem)
  return ids


class Voc2012(common.ManualBuilder, skip_registration=True):
  """VOC 2012 + SBD: 10,582 train (train_aug) / 1,449 validation images, 21 classes."""

  name = datasets.DATASETS['voc2012'].tfds_name
  NUM_CLASSES = datasets.DATASETS['voc2012'].num_classes
  # Labels are used as they are: 0 background, 1..20 objects, 255 boundaries (ignored).
  LABEL_TABLE = files.label_table(num_classes=NUM_CLASSES)
  IMAGE_FORMAT = 'jpeg'
  DESCRIPTION = 'PASCAL VOC 2012 segmentation: train_aug (SBD labels) and val.'
  HOMEPAGE = 'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/'
  EXPECTED = EXPECTED
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Put in the manual directory {EXPECTED}.'

  @classmethod
  def locate(cls, manual_dir: str | os.PathLike, *, skip_bad_examples: bool = False):
    """Finds the image/label pairs of train (train_aug) and validation (val).

    Args:
      manual_dir: directory holding the VOC2012 folder and SegmentationClassAug.
      skip_bad_examples: drop ids without an image or label (logged) instead of failing.

    Returns:
      {'train' | 'validation': [(key, image FileRef, label FileRef)]}.
    """
    manual_dir = pathlib.Path(manual_dir)
    roots = [manual_dir, manual_dir / 'VOC2012', manual_dir / 'VOCdevkit' / 'VOC2012']
    root = next((r for r in roots if (r / 'JPEGImages').is_dir()), None)
    if root is None:
      raise common.MissingDataError(
        f'{manual_dir}: no JPEGImages/ folder in {", ".join(map(str, roots))}. Expected {EXPECTED}.'
      )
    aug = _first_existing([root / 'SegmentationClassAug', manual_dir / 'SegmentationClassAug'])
    val_list = root / 'ImageSets' / 'Segmentation' / 'val.txt'
    for path, name in ((aug, 'SegmentationClassAug/'), (val_list, str(val_list))):
      if path is None or not path.exists():
        raise common.MissingDataError(f'{manual_dir}: {name} not found. Expected {EXPECTED}.')
    if not (root / 'SegmentationClass').is_dir():
      raise common.MissingDataError(f'{root}: SegmentationClass/ not found. Expected {EXPECTED}.')
    val_ids = read_ids(val_list)
    train_list = _first_existing(
      [
        root / 'ImageSets' / 'Segmentation' / 'train_aug.txt',
        manual_dir / 'train_aug.txt',
        root / 'list' / 'train_aug.txt',
        manual_dir / 'list' / 'train_aug.txt',
      ]
    )
    if train_list is not None:
      train_ids = read_ids(train_list)
    else:
      excluded = set(val_ids)
      train_ids = sorted(p.stem for p in aug.glob('*.png') if p.stem not in excluded)
    images = {(p.stem,): common.FileRef(str(p)) for p in (root / 'JPEGImages').glob('*.jpg')}
    splits = {}
    for split, ids, label_dir in (
      ('train', train_ids, aug),
      ('validation', val_ids, root / 'SegmentationClass'),
    ):
      labels = {(p.stem,): common.FileRef(str(p)) for p in label_dir.glob('*.png')}
      wanted = {(i,) for i in ids}
      no_image = sorted(wanted - set(images))
      if no_image:
        message = f'{root}: {len(no_image)} {split} ids have no JPEGImages/<id>.jpg, e.g. ' + (
          ', '.join(i for (i,) in no_image[:5])
        )
        if not skip_bad_examples:
          raise common.MissingDataError(message + '. Pass --skip_bad_examples to leave them out.')
        logging.warning('%s. Skipping them.', message)
      split_images = {k: v for k, v in images.items() if k in wanted}
      splits[split] = common.pair_up(
        split_images,
        labels,
        what=f'{label_dir} ({split})',
        skip_bad_examples=skip_bad_examples,
      )
    return splits
