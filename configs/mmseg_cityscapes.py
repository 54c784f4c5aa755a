"""Cityscapes, mmsegmentation's PSPNet R50-D8 / R101-D8 at 512 x 1024, 40k or 80k iterations.

mmseg 1.2.2 configs/pspnet/pspnet_r{50,101}-d8_4xb2-{40k,80k}_cityscapes-512x1024.py.

Evaluate a zoo checkpoint with mmseg's test protocol (resize to fit (2048, 1024) keeping
the ratio, which leaves Cityscapes' 2048 x 1024 images as they are, one whole-image pass,
no flip, logits resized back, mIoU over the classes present):

  python -m psp_jax.evaluate --config configs/mmseg_cityscapes.py \\
      --checkpoint pspnet_r50-d8_512x1024_80k_cityscapes_20200606_112131-2376f12b.pth

Train with mmseg's recipe (batch 8 = 4 GPUs x 2, crop 512 x 1024, SGD 0.01 / 0.9 / 5e-4,
poly 0.9 to 1e-4 by iteration, RandomResize (2048, 1024) x 0.5-2.0, RandomCrop
cat_max_ratio 0.75, flip, PhotoMetricDistortion; configs/mmseg_recipe.py):

  python train.py --config configs/mmseg_cityscapes.py:r50-80k --workdir runs/mmseg_cs \\
      --config.init_checkpoint=PATH/resnet50_v1c-2cccc1ad.pth

Published single-scale mIoU (mmseg configs/pspnet/README.md, Cityscapes val, whole image,
no flip), with the zoo checkpoint of each variant (under MMSEG_ZOO/<dir>/<file>, <dir> the
file name without date and hash):

  r50-40k    77.85   pspnet_r50-d8_512x1024_40k_cityscapes_20200605_003338-2966598c.pth
  r50-80k    78.55   pspnet_r50-d8_512x1024_80k_cityscapes_20200606_112131-2376f12b.pth
  r101-40k   78.34   pspnet_r101-d8_512x1024_40k_cityscapes_20200604_232751-467e7cf4.pth
  r101-80k   79.76   pspnet_r101-d8_512x1024_80k_cityscapes_20200606_112211-e1e1100f.pth

The default variant is r50-80k.
"""

import ml_collections

from configs import default, mmseg_recipe
from psp_jax.data import datasets

# variant: (depth, iterations, published mIoU, zoo checkpoint file)
VARIANTS = {
  'r50-40k': (
    50,
    40_000,
    77.85,
    'pspnet_r50-d8_512x1024_40k_cityscapes_20200605_003338-2966598c.pth',
  ),
  'r50-80k': (
    50,
    80_000,
    78.55,
    'pspnet_r50-d8_512x1024_80k_cityscapes_20200606_112131-2376f12b.pth',
  ),
  'r101-40k': (
    101,
    40_000,
    78.34,
    'pspnet_r101-d8_512x1024_40k_cityscapes_20200604_232751-467e7cf4.pth',
  ),
  'r101-80k': (
    101,
    80_000,
    79.76,
    'pspnet_r101-d8_512x1024_80k_cityscapes_20200606_112211-e1e1100f.pth',
  ),
}
DEFAULT_VARIANT = 'r50-80k'


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """Cityscapes with mmseg's PSPNet; variant as in VARIANTS."""
  _, (depth, steps, _, _) = mmseg_recipe.parse_variant(variant, VARIANTS, DEFAULT_VARIANT)
  config = default.get_config()
  config.data.name = 'cityscapes'
  dataset = datasets.DATASETS['cityscapes']
  config.data.num_classes = dataset.num_classes
  return mmseg_recipe.apply(
    config, depth=depth, steps=steps, batch_size=8, crop_size=(512, 1024), scale=dataset.mmseg_scale
  )
