"""PASCAL VOC 2012 + aug, mmsegmentation's PSPNet R50-D8 / R101-D8 at 512 x 512, 20k or 40k.

mmseg 1.2.2 configs/pspnet/pspnet_r{50,101}-d8_4xb4-{20k,40k}_voc12aug-512x512.py.

Evaluate a zoo checkpoint with mmseg's test protocol (resize to fit (2048, 512) keeping the
ratio, one whole-image pass, no flip, logits resized back, mIoU over the classes present):

  python -m psp_jax.evaluate --config configs/mmseg_voc2012.py \\
      --checkpoint pspnet_r50-d8_512x512_40k_voc12aug_20200613_161222-ae9c1b8c.pth

Train with mmseg's recipe (batch 16 = 4 GPUs x 4, crop 512, SGD 0.01 / 0.9 / 5e-4, poly 0.9
to 1e-4 by iteration, RandomResize (2048, 512) x 0.5-2.0, RandomCrop cat_max_ratio 0.75,
flip, PhotoMetricDistortion; configs/mmseg_recipe.py). mmseg trains on train + aug
concatenated (12,046 entries, VOC's train images twice); data.name 'voc2012' is train_aug
(10,582). Its 1.x config pads small crops with black (--config.data.mmseg.pad=black); the
0.x config that trained the zoo pads with the mean, the default here.

  python train.py --config configs/mmseg_voc2012.py:r50-40k --workdir runs/mmseg_voc \\
      --config.init_checkpoint=PATH/resnet50_v1c-2cccc1ad.pth

Published single-scale mIoU (mmseg configs/pspnet/README.md, VOC 2012 val, whole image, no
flip), with the zoo checkpoint of each variant (under MMSEG_ZOO/<dir>/<file>, <dir> the file
name without date and hash):

  r50-20k    76.78   pspnet_r50-d8_512x512_20k_voc12aug_20200617_101958-ed5dfbd9.pth
  r50-40k    77.29   pspnet_r50-d8_512x512_40k_voc12aug_20200613_161222-ae9c1b8c.pth
  r101-20k   78.47   pspnet_r101-d8_512x512_20k_voc12aug_20200617_102003-4aef3c9a.pth
  r101-40k   78.52   pspnet_r101-d8_512x512_40k_voc12aug_20200613_161222-bc933b18.pth

The default variant is r50-40k.
"""

import ml_collections

from configs import default, mmseg_recipe
from psp_jax.data import datasets

# variant: (depth, iterations, published mIoU, zoo checkpoint file)
VARIANTS = {
  'r50-20k': (50, 20_000, 76.78, 'pspnet_r50-d8_512x512_20k_voc12aug_20200617_101958-ed5dfbd9.pth'),
  'r50-40k': (50, 40_000, 77.29, 'pspnet_r50-d8_512x512_40k_voc12aug_20200613_161222-ae9c1b8c.pth'),
  'r101-20k': (
    101,
    20_000,
    78.47,
    'pspnet_r101-d8_512x512_20k_voc12aug_20200617_102003-4aef3c9a.pth',
  ),
  'r101-40k': (
    101,
    40_000,
    78.52,
    'pspnet_r101-d8_512x512_40k_voc12aug_20200613_161222-bc933b18.pth',
  ),
}
DEFAULT_VARIANT = 'r50-40k'


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """VOC 2012 with mmseg's PSPNet; variant as in VARIANTS."""
  _, (depth, steps, _, _) = mmseg_recipe.parse_variant(variant, VARIANTS, DEFAULT_VARIANT)
  config = default.get_config()
  config.data.name = 'voc2012'
  dataset = datasets.DATASETS['voc2012']
  config.data.num_classes = dataset.num_classes
  return mmseg_recipe.apply(
    config, depth=depth, steps=steps, batch_size=16, crop_size=512, scale=dataset.mmseg_scale
  )
