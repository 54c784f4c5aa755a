"""Cityscapes on whole 1024x2048 images: configs/cityscapes.py with the crop the full frame.

No crop of the official recipe (713) sees a whole Cityscapes frame; this one does, which one
v5e chip cannot hold at two images a chip. Split each image over chips instead:

  python train.py --config configs/cityscapes_whole.py --workdir runs/cityscapes-whole \\
      --config.spatial_partitions=2   # 32 devices: 16 images x 2 (docs/tpu.md)

The pre-flight compiles it for v5e:4x8 (benchmarks/tpu_spatial.py).
"""

import ml_collections

from configs import cityscapes


def get_config() -> ml_collections.ConfigDict:
  """Cityscapes fine PSPNet-50 on 1024x2048 crops (whole frames)."""
  config = cityscapes.get_config()
  with config.ignore_type():  # The schema's crop_size is an int; a frame is a pair.
    config.data.crop_size = (1024, 2048)
  return config
