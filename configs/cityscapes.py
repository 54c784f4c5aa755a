"""Cityscapes (fine), PSPNet-50 (hszhao/semseg config/cityscapes/cityscapes_pspnet50.yaml).

  python -m psp_jax.data.prepare cityscapes --manual_dir DIR   # once; the two zip files
  python train.py --config configs/cityscapes.py --workdir runs/cityscapes \\
      --config.init_checkpoint=PATH/resnet50_v2.pth
  python -m psp_jax.evaluate --config configs/cityscapes.py --checkpoint runs/cityscapes

Trained on fine train (2,975 images), evaluated on fine val (500): batch 16, crop 713,
200 epochs = 37,000 steps (the original's DistributedSampler pads each GPU's share, giving
186 steps an epoch, 37,200), 19 train ids, otherwise the ADE20K recipe.

Published (hszhao/semseg README, Cityscapes fine val, single scale, mIoU / mAcc / allAcc):
PSPNet-50 77.30 / 84.31 / 95.97 (multi-scale 78.38 / 84.86 / 96.17); PSPNet-101
78.63 / 85.77 / 96.14. Paper: 78.4 mIoU on the test set (fine only). These start from an
ImageNet-pretrained backbone.
"""

import ml_collections

from configs import default
from psp_jax.data import datasets


def get_config() -> ml_collections.ConfigDict:
  """Cityscapes fine PSPNet-50."""
  config = default.get_config()
  config.data.name = 'cityscapes'
  config.data.num_classes = datasets.DATASETS['cityscapes'].num_classes  # classes: 19
  config.data.crop_size = 713  # train_h / train_w: 713
  config.num_epochs = 200  # epochs: 200
  config.batch_size = 16  # batch_size: 16
  config.optim.loss_groups = 8  # 8 GPUs x 2 images, each GPU's loss its own mean
  config.eval.base_size = datasets.DATASETS['cityscapes'].base_size  # base_size: 2048
  return config
