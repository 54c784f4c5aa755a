"""PASCAL VOC 2012, PSPNet-50 (hszhao/semseg config/voc2012/voc2012_pspnet50.yaml).

  python -m psp_jax.data.prepare voc2012 --manual_dir DIR   # once; VOC2012 + SegmentationClassAug
  python train.py --config configs/voc2012.py --workdir runs/voc2012 \\
      --config.init_checkpoint=PATH/resnet50_v2.pth
  python -m psp_jax.evaluate --config configs/voc2012.py --checkpoint runs/voc2012

Trained on train_aug (10,582 images), evaluated on val (1,449): batch 16, crop 473,
50 epochs = 33,050 steps, otherwise the ADE20K recipe.

Published (hszhao/semseg README, VOC 2012 val, single scale, mIoU / mAcc / allAcc):
PSPNet-50 77.05 / 85.13 / 94.89 (multi-scale 78.02 / 85.80 / 95.13); PSPNet-101
79.07 / 86.36 / 95.34. Paper: 82.6 mIoU on the test set (85.4 with MS-COCO pre-training).
These start from an ImageNet-pretrained backbone.
"""

import ml_collections

from configs import default
from psp_jax.data import datasets


def get_config() -> ml_collections.ConfigDict:
  """VOC 2012 (train_aug) PSPNet-50."""
  config = default.get_config()
  config.data.name = 'voc2012'
  config.data.num_classes = datasets.DATASETS['voc2012'].num_classes  # classes: 21
  config.data.crop_size = 473  # train_h / train_w: 473
  config.num_epochs = 50  # epochs: 50
  config.batch_size = 16  # batch_size: 16
  config.optim.loss_groups = 8  # 8 GPUs x 2 images, each GPU's loss its own mean
  config.eval.base_size = datasets.DATASETS['voc2012'].base_size  # base_size: 512
  return config
