"""ADE20K, PSPNet-50: the official recipe (hszhao/semseg config/ade20k/ade20k_pspnet50.yaml).

  python -m psp_jax.data.prepare ade20k --manual_dir DIR   # once; DIR holds ADEChallengeData2016
  python train.py --config configs/ade20k.py --workdir runs/ade20k \\
      --config.init_checkpoint=PATH/resnet50_v2.pth
  python -m psp_jax.evaluate --config configs/ade20k.py --checkpoint runs/ade20k

Batch 16 (global: spread over all devices), crop 473, 100 epochs = 126,300 steps of SGD
(lr 0.01, poly 0.9, head x10, momentum 0.9, wd 1e-4), aux loss 0.4, SyncBN. PSPNet-101:
--config.model.depth=101 (with resnet101_v2.pth).

Published (hszhao/semseg README, ADE20K val, 2,000 images, single scale, mIoU / mAcc /
allAcc): PSPNet-50 41.89 / 52.27 / 80.39 (multi-scale 42.84 / 52.66 / 81.06); PSPNet-101
43.10 / 53.75 / 81.07. Paper (ResNet-50): 41.68 mIoU, 80.04 pixel accuracy. The original
starts from an ImageNet-pretrained backbone; from scratch expect far less. mIoU here is the
official mean over all 150 classes (eval.protocol='official').
"""

import ml_collections

from configs import default
from psp_jax.data import datasets


def get_config() -> ml_collections.ConfigDict:
  """ADE20K PSPNet-50 (the default config, spelt out)."""
  config = default.get_config()
  config.data.name = 'ade20k'
  config.data.num_classes = datasets.DATASETS['ade20k'].num_classes  # classes: 150
  config.data.crop_size = 473  # train_h / train_w: 473
  config.num_epochs = 100  # epochs: 100
  config.batch_size = 16  # batch_size: 16
  config.optim.loss_groups = 8  # 8 GPUs x 2 images, each GPU's loss its own mean
  config.eval.base_size = datasets.DATASETS['ade20k'].base_size  # base_size: 512 (TEST)
  return config
