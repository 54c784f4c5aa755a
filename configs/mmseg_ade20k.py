"""ADE20K, mmsegmentation's PSPNet R50-D8 / R101-D8 at 512 x 512, 80k or 160k iterations.

mmseg 1.2.2 configs/pspnet/pspnet_r{50,101}-d8_4xb4-{80k,160k}_ade20k-512x512.py.

Evaluate a zoo checkpoint with mmseg's test protocol (resize to fit (2048, 512) keeping the
ratio, one whole-image pass, no flip, logits resized back, mIoU over the classes present):

  python -m psp_jax.evaluate --config configs/mmseg_ade20k.py \\
      --checkpoint pspnet_r50-d8_512x512_160k_ade20k_20200615_184358-1890b0bd.pth
  python -m psp_jax.evaluate --config configs/mmseg_ade20k.py:r101-80k --checkpoint ...

Train with mmseg's recipe (batch 16 = 4 GPUs x 4, crop 512, SGD 0.01 / 0.9 / 5e-4, poly 0.9
to 1e-4 by iteration, no head multiplier, RandomResize (2048, 512) x 0.5-2.0, RandomCrop
cat_max_ratio 0.75, flip, PhotoMetricDistortion; configs/mmseg_recipe.py has the details):

  python train.py --config configs/mmseg_ade20k.py:r50-160k --workdir runs/mmseg_ade20k \\
      --config.init_checkpoint=PATH/resnet50_v1c-2cccc1ad.pth   # mmseg's ImageNet backbone

Published single-scale mIoU (mmseg configs/pspnet/README.md, ADE20K val, whole image, no
flip), with the zoo checkpoint each variant evaluates (under MMSEG_ZOO/<dir>/<file>):

  r50-80k    41.13   pspnet_r50-d8_512x512_80k_ade20k_20200615_014128-15a8b914.pth
  r50-160k   42.48   pspnet_r50-d8_512x512_160k_ade20k_20200615_184358-1890b0bd.pth
  r101-80k   43.57   pspnet_r101-d8_512x512_80k_ade20k_20200614_031423-b6e782f0.pth
  r101-160k  44.39   pspnet_r101-d8_512x512_160k_ade20k_20200615_100650-967c316f.pth

(<dir> is the file name without its date and hash, e.g. pspnet_r50-d8_512x512_160k_ade20k.)
The default variant is r50-160k.
"""

import ml_collections

from configs import default, mmseg_recipe
from psp_jax.data import datasets

# variant: (depth, iterations, published mIoU, zoo checkpoint file)
VARIANTS = {
  'r50-80k': (50, 80_000, 41.13, 'pspnet_r50-d8_512x512_80k_ade20k_20200615_014128-15a8b914.pth'),
  'r50-160k': (
    50,
    160_000,
    42.48,
    'pspnet_r50-d8_512x512_160k_ade20k_20200615_184358-1890b0bd.pth',
  ),
  'r101-80k': (
    101,
    80_000,
    43.57,
    'pspnet_r101-d8_512x512_80k_ade20k_20200614_031423-b6e782f0.pth',
  ),
  'r101-160k': (
    101,
    160_000,
    44.39,
    'pspnet_r101-d8_512x512_160k_ade20k_20200615_100650-967c316f.pth',
  ),
}
DEFAULT_VARIANT = 'r50-160k'


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """ADE20K with mmseg's PSPNet; variant as in VARIANTS (the text after ':' in --config)."""
  _, (depth, steps, _, _) = mmseg_recipe.parse_variant(variant, VARIANTS, DEFAULT_VARIANT)
  config = default.get_config()
  config.data.name = 'ade20k'
  dataset = datasets.DATASETS['ade20k']
  config.data.num_classes = dataset.num_classes
  return mmseg_recipe.apply(
    config, depth=depth, steps=steps, batch_size=16, crop_size=512, scale=dataset.mmseg_scale
  )
