"""What the code knows of each supported data set without reading it: one entry per data set.

datasets.DATASETS['cityscapes'].splits['train']   # 2975
"""

import dataclasses
from collections.abc import Mapping

from psp_jax.data import classes


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One data set's facts; None where they do not apply (the synthetic set is generated).

  Attributes:
    name: its config.data.name; the key of classes.CLASS_NAMES and classes.PALETTES.
    tfds_name: the name of its TFDS builder (its folder under the TFDS data_dir).
    splits: images of each prepared split, by split name (config.data.train_split /
      eval_split), for num_epochs recipes without reading the data set.
    base_size: the official test's long side (hszhao/semseg config/<name>/*.yaml base_size).
    crop: the official crop (height, width): train_h / train_w, and test_h / test_w.
    mmseg_scale: mmseg's (long, short) scale (configs/_base_/datasets/<name>.py: its
      RandomResize at ratio 1 and its test Resize keep_ratio).
    mmseg_crop: mmseg's crop (height, width) (RandomCrop's, and the window of a slide test).
  """

  name: str
  tfds_name: str
  splits: Mapping[str, int] | None
  base_size: int | None = None
  crop: tuple[int, int] | None = None
  mmseg_scale: tuple[int, int] | None = None
  mmseg_crop: tuple[int, int] | None = None

  @property
  def class_names(self) -> tuple[str, ...]:
    return classes.CLASS_NAMES[self.name]

  @property
  def num_classes(self) -> int:
    """Classes evaluated: label values 0..num_classes - 1 (255 is ignored)."""
    return len(self.class_names)


DATASETS: dict[str, Dataset] = {
  'ade20k': Dataset(  # SceneParsing, 150 classes
    'ade20k',
    'psp_ade20k',
    {'train': 20_210, 'validation': 2_000},
    base_size=512,
    crop=(473, 473),
    mmseg_scale=(2048, 512),
    mmseg_crop=(512, 512),
  ),
  'voc2012': Dataset(  # 21 classes, background included
    'voc2012',
    'psp_voc2012',
    {'train': 10_582, 'validation': 1_449},  # train_aug (SegmentationClassAug) / val
    base_size=512,
    crop=(473, 473),
    mmseg_scale=(2048, 512),
    mmseg_crop=(512, 512),
  ),
  'cityscapes': Dataset(  # 19 train ids
    'cityscapes',
    'psp_cityscapes',
    {'train': 2_975, 'validation': 500},  # fine train / val (test, 1,525, when prepared)
    base_size=2048,
    crop=(713, 713),
    mmseg_scale=(2048, 1024),
    mmseg_crop=(512, 1024),
  ),
  # Generated (psp_jax.data.synthetic): its split sizes are config.data.synthetic's.
  'synthetic': Dataset('synthetic', 'psp_synthetic', None),
}
# The public benchmarks (each has a builder in psp_jax.data.builders). A checkpoint that does
# not say which data set it was trained on is taken for the benchmark of its number of
# classes; never for the synthetic set, whose 11 classes a small model may have by chance.
BENCHMARKS = ('ade20k', 'voc2012', 'cityscapes')
# mmsegmentation's test of its PSPNet configs, on every data set (configs/_base_/datasets/
# *.py test_pipeline: Resize keep_ratio to fit mmseg_scale; test_cfg mode 'whole'; no flip;
# raw logits resized back): config.eval / InferenceConfig values.
MMSEG_TEST = dict(
  mode='whole',
  resize='fit',
  scales=(1.0,),
  flip=False,
  average='logits',
  clip_windows=True,
  whole_multiple=1,
)


def by_classes(num_classes: int) -> str | None:
  """The benchmark with num_classes classes, None if there is none."""
  found = [name for name in BENCHMARKS if DATASETS[name].num_classes == num_classes]
  return found[0] if found else None


def train_images(name: str) -> int | None:
  """Images in the training split of a data set, None where the table does not know them."""
  dataset = DATASETS.get(name)
  return dataset.splits['train'] if dataset is not None and dataset.splits else None
