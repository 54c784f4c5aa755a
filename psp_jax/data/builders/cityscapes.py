"""TFDS builder of Cityscapes fine annotations (19 train ids) from a manual directory."""

import os
import pathlib

from psp_jax.data import classes, datasets, files
from psp_jax.data.builders import common

IMAGES_ZIP = 'leftImg8bit_trainvaltest.zip'
LABELS_ZIP = 'gtFine_trainvaltest.zip'
_SPLITS = {'train': 'train', 'validation': 'val', 'test': 'test'}
EXPECTED = (
  'leftImg8bit/{train,val}/<city>/*_leftImg8bit.png (the folder, or the archive '
  f'{IMAGES_ZIP}) and gtFine/{{train,val}}/<city>/*_gtFine_labelIds.png (the folder, or the '
  f'archive {LABELS_ZIP}), as downloaded from https://www.cityscapes-dataset.com/downloads/ '
  '(packages 1 and 3); test/ is used when present'
)


def _tree(manual_dir: pathlib.Path, folder: str, archive: str) -> dict[str, common.FileRef]:
  if (manual_dir / folder).is_dir():
    return {
      f'{folder}/{path}': ref for path, ref in common.folder_tree(manual_dir / folder).items()
    }
  if (manual_dir / archive).is_file():
    return common.zip_tree(manual_dir / archive)
  raise common.MissingDataError(
    f'{manual_dir} holds neither {folder}/ nor {archive}. Expected {EXPECTED}.'
  )


class Cityscapes(common.ManualBuilder, skip_registration=True):
  """Cityscapes fine: 2,975 train / 500 validation (/ 1,525 test) images, 19 classes."""

  name = datasets.DATASETS['cityscapes'].tfds_name
  NUM_CLASSES = datasets.DATASETS['cityscapes'].num_classes
  # The official cityscapesScripts label id -> train id table; ids it does not evaluate
  # become 255 (ignored), as in the semseg *_gtFine_labelTrainIds.png lists.
  LABEL_TABLE = files.label_table(dict(enumerate(classes.CITYSCAPES_TRAIN_IDS)))
  IMAGE_FORMAT = 'png'
  DESCRIPTION = 'Cityscapes gtFine; label ids mapped to the 19 train ids (others 255).'
  HOMEPAGE = 'https://www.cityscapes-dataset.com/'
  EXPECTED = EXPECTED
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Put in the manual directory {EXPECTED}.'

  @classmethod
  def locate(cls, manual_dir: str | os.PathLike, *, skip_bad_examples: bool = False):
    """Finds the image/label pairs of each split in the folders or the zip archives.

    Args:
      manual_dir: directory holding leftImg8bit/ + gtFine/ or the two official zips.
      skip_bad_examples: drop images without a label (logged) instead of failing.

    Returns:
      {'train' | 'validation' [| 'test']: [(key, image FileRef, label FileRef)]}.
    """
    manual_dir = pathlib.Path(manual_dir)
    images_tree = _tree(manual_dir, 'leftImg8bit', IMAGES_ZIP)
    labels_tree = _tree(manual_dir, 'gtFine', LABELS_ZIP)
    splits = {}
    for split, folder in _SPLITS.items():
      images = common.match(
        images_tree, rf'(?:^|/)leftImg8bit/{folder}/([^/]+)/([^/]+)_leftImg8bit\.png$'
      )
      labels = common.match(
        labels_tree, rf'(?:^|/)gtFine/{folder}/([^/]+)/([^/]+)_gtFine_labelIds\.png$'
      )
      if not images and split == 'test':
        continue
      if not images:
        raise common.MissingDataError(
          f'{manual_dir}: no leftImg8bit/{folder}/<city>/*_leftImg8bit.png found. '
          f'Expected {EXPECTED}.'
        )
      splits[split] = common.pair_up(
        images, labels, what=f'{manual_dir} {folder}', skip_bad_examples=skip_bad_examples
      )
    return splits
