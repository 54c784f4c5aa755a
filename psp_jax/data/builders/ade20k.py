"""TFDS builder of ADE20K SceneParsing (ADEChallengeData2016) from a manual directory."""

import os
import pathlib

from psp_jax.data import datasets, files
from psp_jax.data.builders import common

ARCHIVE = 'ADEChallengeData2016.zip'
FOLDER = 'ADEChallengeData2016'
_SPLITS = {'train': 'training', 'validation': 'validation'}
EXPECTED = (
  f'either the folder {FOLDER}/ holding images/training/*.jpg, images/validation/*.jpg, '
  f'annotations/training/*.png and annotations/validation/*.png (or those four folders '
  f'directly), or the archive {ARCHIVE} as downloaded from '
  'http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip'
)


class Ade20k(common.ManualBuilder, skip_registration=True):
  """ADE20K: 20,210 train / 2,000 validation images, 150 classes."""

  name = datasets.DATASETS['ade20k'].tfds_name
  NUM_CLASSES = datasets.DATASETS['ade20k'].num_classes
  # PNG value 0 is 'other' and is ignored; value k is class k - 1 (the SceneParsing
  # benchmark's 150 classes, as the semseg lists use them with ignore_label 255).
  LABEL_TABLE = files.label_table({0: 255, **{k: k - 1 for k in range(1, NUM_CLASSES + 1)}})
  IMAGE_FORMAT = 'jpeg'
  DESCRIPTION = 'ADE20K SceneParsing (ADEChallengeData2016); labels 0 -> 255, k -> k - 1.'
  HOMEPAGE = 'http://sceneparsing.csail.mit.edu/'
  EXPECTED = EXPECTED
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Put in the manual directory {EXPECTED}.'

  @classmethod
  def locate(cls, manual_dir: str | os.PathLike, *, skip_bad_examples: bool = False):
    """Finds the image/label pairs of each split in the folder or the zip archive.

    Args:
      manual_dir: directory holding ADEChallengeData2016/ or ADEChallengeData2016.zip.
      skip_bad_examples: drop images without a label (logged) instead of failing.

    Returns:
      {'train' | 'validation': [(key, image FileRef, label FileRef)]}.
    """
    manual_dir = pathlib.Path(manual_dir)
    if (manual_dir / FOLDER).is_dir():
      tree, where = common.folder_tree(manual_dir / FOLDER), manual_dir / FOLDER
    elif (manual_dir / 'images').is_dir() and (manual_dir / 'annotations').is_dir():
      tree, where = common.folder_tree(manual_dir), manual_dir
    elif (manual_dir / ARCHIVE).is_file():
      tree, where = common.zip_tree(manual_dir / ARCHIVE), manual_dir / ARCHIVE
    else:
      raise common.MissingDataError(f'{manual_dir} does not hold ADE20K. Expected {EXPECTED}.')
    splits = {}
    for split, folder in _SPLITS.items():
      images = common.match(tree, rf'(?:^|/)images/{folder}/(.+)\.jpg$')
      labels = common.match(tree, rf'(?:^|/)annotations/{folder}/(.+)\.png$')
      if not images:
        raise common.MissingDataError(
          f'{where}: no images/{folder}/*.jpg found. Expected {EXPECTED}.'
        )
      splits[split] = common.pair_up(
        images, labels, what=f'{where} {folder}', skip_bad_examples=skip_bad_examples
      )
    return splits
