"""mmsegmentation's PSPNet settings, shared by configs/mmseg_{ade20k,cityscapes,voc2012}.py.

Not a config itself: `apply` turns configs/default.py into mmseg's network, training recipe
and test protocol (mmseg 1.2.2 configs/pspnet/pspnet_r50-d8_*, configs/_base_/):

- network: ResNetV1c stem (32, 32, 64), contract_dilation, align_corners=False;
- SGD lr 0.01, momentum 0.9, weight decay 5e-4 on every parameter, no head multiplier,
  poly power 0.9 by iteration down to 1e-4 (mmcv's PolyLrUpdaterHook, min_lr=1e-4);
- loss: decode + 0.4 x auxiliary cross-entropy, each divided by all pixels of the batch,
  ignored and padded ones included (CrossEntropyLoss with avg_non_ignore=False:
  optim.loss_normalization 'all');
- augmentation: RandomResize of `scale` by 0.5-2.0 keeping the ratio, RandomCrop with
  cat_max_ratio 0.75, RandomFlip 0.5, PhotoMetricDistortion, padding with the mean
  (psp_jax.data.mmseg_augment);
- test: resize to fit `scale` keeping the ratio, one whole-image pass at exactly that size
  (no padding: eval.whole_multiple 1, which compiles once per distinct resized size;
  --config.eval.whole_multiple=32 trades exactness near the borders for a few buckets), no
  flip, raw logits resized back to the original size, mIoU over the classes present.

BatchNorm is synchronised over the whole batch, as mmseg's SyncBN is.
"""

import ml_collections

from psp_jax.data import datasets

MMSEG_ZOO = 'https://download.openmmlab.com/mmsegmentation/v0.5/pspnet'
# ImageNet backbones of mmseg's configs (pretrained='open-mmlab://resnet50_v1c').
BACKBONES = {
  50: 'https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth',
  101: 'https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth',
}


def parse_variant(variant: str | None, known: dict, default: str) -> tuple[str, tuple]:
  """(name, VARIANTS entry) of the text after ':' in --config; '' or None is the default."""
  name = variant or default
  if name not in known:
    raise ValueError(f'Unknown variant {name!r}; known: {sorted(known)}.')
  return name, known[name]


def apply(
  config: ml_collections.ConfigDict,
  *,
  depth: int,
  steps: int,
  batch_size: int,
  crop_size: int | tuple[int, int],
  scale: tuple[int, int],
) -> ml_collections.ConfigDict:
  """mmseg's network, recipe and test protocol on `config` (changed in place and returned).

  Args:
    config: from configs/default.py, data.name and num_classes already set.
    depth: 50 or 101 (R50-D8, R101-D8).
    steps: iterations (80k, 160k, ...).
    batch_size: images per iteration over all GPUs (4 GPUs x 4, or x 2 for Cityscapes).
    crop_size: RandomCrop's crop (512 or (512, 1024)).
    scale: the (long, short) edges of RandomResize at ratio 1 and of the test Resize.
  """
  model = config.model
  model.depth = depth
  model.stem = 'deep_v1c'
  model.contract_dilation = True
  model.align_corners = False

  data = config.data
  with config.ignore_type():  # The schema's crop_size is an int; (512, 1024) is a pair.
    data.crop_size = crop_size
  data.recipe = 'mmseg'
  data.mmseg.scale = scale
  data.mmseg.cat_max_ratio = 0.75
  data.mmseg.photometric = True
  data.mmseg.pad = 'mean'
  data.scale_range = (0.5, 2.0)  # RandomResize ratio_range
  # None (no rotation), kept tuple-typed so that --config.data.rotate_range=... still parses.
  data.rotate_range = ml_collections.config_dict.placeholder(tuple)
  data.blur = False
  data.flip = True

  optim = config.optim
  optim.base_lr = 0.01
  optim.momentum = 0.9
  optim.weight_decay = 5e-4
  optim.power = 0.9
  optim.min_lr = 1e-4
  optim.head_lr_mult = 1.0
  optim.aux_weight = 0.4
  optim.loss_groups = 1
  optim.loss_normalization = 'all'

  config.batch_size = batch_size
  config.num_train_steps = steps
  config.log_every_steps = 50
  config.eval_every_steps = steps // 10  # mmseg's val_interval
  config.checkpoint_every_steps = 2_000

  ev = config.eval
  ev.update(datasets.MMSEG_TEST)  # mode 'whole', resize 'fit', no flip, 'logits', ...
  ev.fit_scale = scale
  ev.protocol = 'mmseg'
  return config
