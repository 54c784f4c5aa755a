"""The project's TFDS builders, by config.data.name (the synthetic one is in .synthetic)."""

from psp_jax.data.builders.ade20k import Ade20k
from psp_jax.data.builders.cityscapes import Cityscapes
from psp_jax.data.builders.common import ManualBuilder, MissingDataError
from psp_jax.data.builders.voc2012 import Voc2012

BUILDERS: dict[str, type[ManualBuilder]] = {
  'ade20k': Ade20k,
  'voc2012': Voc2012,
  'cityscapes': Cityscapes,
}

__all__ = ['BUILDERS', 'Ade20k', 'Cityscapes', 'ManualBuilder', 'MissingDataError', 'Voc2012']
