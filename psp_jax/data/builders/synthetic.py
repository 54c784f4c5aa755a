"""TFDS builder of the synthetic scene-parsing data set (psp_jax.data.synthetic), no download."""

import dataclasses
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from psp_jax.data import datasets, synthetic
from psp_jax.data.builders import common


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Image size, split sizes and seed of one synthetic data set."""

  image_size: int = 129
  num_train: int = 2000
  num_val: int = 200
  seed: int = 0


def make_config(
  image_size: int = 129, num_train: int = 2000, num_val: int = 200, seed: int = 0
) -> SyntheticConfig:
  """The config for these options; its name (the folder under psp_synthetic/) says them."""
  for key, value in dict(image_size=image_size, num_train=num_train, num_val=num_val).items():
    if int(value) < (16 if key == 'image_size' else 1):
      raise ValueError(f'synthetic {key} must be positive (image_size >= 16), got {value}.')
  return SyntheticConfig(
    name=f'size{image_size}_train{num_train}_val{num_val}_seed{seed}',
    version=tfds.core.Version('1.0.0'),
    description=f'{num_train} train + {num_val} validation {image_size}x{image_size} images, '
    f'seed {seed}',
    image_size=int(image_size),
    num_train=int(num_train),
    num_val=int(num_val),
    seed=int(seed),
  )


def _hide_custom_config_warning(record: logging.LogRecord) -> bool:
  return not record.getMessage().startswith('Using custom data configuration')


class Synthetic(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Synthetic street/harbour/pasture/beach scenes; see psp_jax.data.synthetic."""

  name = datasets.DATASETS['synthetic'].tfds_name
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [make_config()]

  def __init__(self, *, num_workers: int | None = None, **kwargs):
    self.num_workers = num_workers or os.cpu_count() or 1
    config = kwargs.get('config')
    if isinstance(config, SyntheticConfig) and config.name in self.builder_configs:
      kwargs['config'] = config.name  # TFDS refuses an equal copy of a listed config.
    # Every combination of options is its own config by design: TFDS's warning about
    # "custom data configurations" says nothing useful here.
    absl_logger = logging.getLogger('absl')
    absl_logger.addFilter(_hide_custom_config_warning)
    try:
      super().__init__(**kwargs)
    finally:
      absl_logger.removeFilter(_hide_custom_config_warning)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=(synthetic.__doc__ or '').split('\n')[0],
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
          'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
          'scene': tfds.features.ClassLabel(names=synthetic.SCENES),
          'index': tfds.features.Scalar(dtype=np.int64),
        }
      ),
      supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download.
    config = self.builder_config
    return {
      'train': self._generate_examples('train', config.num_train),
      'validation': self._generate_examples('validation', config.num_val),
    }

  def _generate_examples(self, split: str, num_examples: int):
    config = self.builder_config

    def example(index: int):
      image, label, scene = synthetic.render(config.seed, split, index, config.image_size)
      return f'{split}_{index:06d}', {
        # Lossless, and fast to write: compression level 1.
        'image': common.png_bytes(image, compress_level=1),
        'label': common.png_bytes(label, compress_level=1),
        'scene': scene,
        'index': index,
      }

    yield from common.ordered_map(example, range(num_examples), self.num_workers)
