"""The built-in synthetic data set on a CPU-sized PSPNet: `make train` runs this.

  python train.py --config configs/synthetic.py --workdir runs/synthetic
  tensorboard --logdir runs/synthetic

The data (psp_jax.data.synthetic: 11 classes, 129x129 scenes whose objects can only be
told apart by the scene around them) is generated on first use. The network is the real
PSPNet (deep stem, dilated ResNet at output stride 8, the (1, 2, 3, 6) pyramid, aux head,
SyncBN, the official optimiser and losses) at a width a 2-core CPU trains in minutes.

Measured on 2 CPU cores on 2026-11-26 (jax 0.10.2, data and compilation cache empty): 2 min
45 s in all (8 s generating the data, 7.5 s to the end of the first step, then about 80
images/s). Validation mIoU: 0.68 after 100 steps, 0.91 after 500 and 600 (official protocol:
mean over all 11 classes, 200 validation images, whole image); car/boat and cow/seal, which
only the scene tells apart, each reach 0.91-0.95 IoU.
"""

import ml_collections

from configs import default
from psp_jax.data import datasets


def get_config() -> ml_collections.ConfigDict:
  """Synthetic scenes, small PSPNet, minutes on a CPU."""
  config = default.get_config()
  # The real architecture, thinned: basic-block ResNet-18 with 16..128 channels (layer4: 128,
  # so each pyramid branch has 32), cls 64 and aux 32 channels. float32: XLA's CPU
  # convolutions are no faster in bfloat16.
  config.model.depth = 18
  config.model.width = 16
  config.model.head_channels = 64
  config.model.aux_channels = 32
  config.model.dtype = 'float32'

  config.data.name = 'synthetic'
  config.data.num_classes = datasets.DATASETS['synthetic'].num_classes  # 11
  # 97 = 8 * 12 + 1 (a 13 x 13 feature map, the official 8k + 1 shape): three quarters of
  # the 129-pixel images, so a crop still shows enough scene to tell a car from a boat.
  config.data.crop_size = 97
  config.data.scale_range = (0.75, 1.5)  # The objects' sizes already vary 0.12-0.95.
  config.data.shuffle_buffer = 2_000  # The whole training split.

  config.optim.base_lr = 0.02  # Twice the official rate: a short run from scratch.
  config.batch_size = 16
  config.num_train_steps = 600  # 4.8 epochs of the 2,000 training images.

  config.log_every_steps = 10
  config.eval_every_steps = 100
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2

  # psp_jax.evaluate on this config: the whole 129-pixel image in one pass (in-training
  # validation always is); base_size 129 keeps the images at their size.
  config.eval.mode = 'whole'
  config.eval.base_size = 129
  config.eval.batch_size = 8
  config.eval.whole_multiple = 1
  return config
