"""The experiment config's schema: every key, its default (PSPNet-50, the official recipe).

The one declaration of every key and its default value: code reads keys directly
(`config.eval.stride`), psp_jax.train.config_checks checks configs against it and `upgrade`
reads a stored config.json into it. configs/*.py start from this one (through
configs/default.py) and override a few keys; values copied from the original (hszhao/semseg,
ADE20K yaml) name the yaml key they mirror. Any key can be overridden on the command line:

  python train.py --config configs/default.py --workdir runs/x --config.optim.base_lr=0.02
"""

from collections.abc import Mapping
from typing import Any

import ml_collections

from psp_jax import errors

# config.model holds PSPNet's keyword arguments: besides those declared below, a config may
# set any other (bn_epsilon, ...), which psp_jax.train.config_checks checks against the model.
OPEN_SECTIONS = ('model',)


def get_config() -> ml_collections.ConfigDict:
  """Returns the default (ADE20K PSPNet-50) configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Model: psp_jax.models.PSPNet keyword arguments.
  config.model = ml_collections.ConfigDict()
  config.model.depth = 50  # layers: 50
  # 'deep': three 3x3 convs w, w, 2w (the released resnet50_v2); 'deep_v1c': mmseg's
  # ResNetV1c, 3x3 convs w/2, w/2, w; 'classic': one 7x7 (torchvision).
  config.model.stem = 'deep'
  # mmseg's contract_dilation: block 0 of each dilated stage at half its dilation (False: all
  # blocks at the stage's dilation, as the official model).
  config.model.contract_dilation = False
  config.model.output_stride = 8  # zoom_factor: 8 (dilated layer3/layer4)
  config.model.width = 64  # channels of layer1's bottleneck; 64 is the real ResNet
  config.model.bins = (1, 2, 3, 6)  # bins: [1, 2, 3, 6]
  config.model.pool = 'avg'  # 'avg' or 'max' (paper Table 1)
  config.model.use_ppm = True  # use_ppm: True; False gives the dilated-FCN baseline
  config.model.reduce_dim = True  # 1x1 dimension reduction in each pyramid branch
  config.model.head_channels = 512  # cls 3x3 conv width
  config.model.aux_channels = 256  # aux 3x3 conv width
  config.model.dropout_rate = 0.1  # Dropout2d(p=0.1) in cls and aux
  # align_corners of every bilinear resize (pyramid branches, final logits): True is the
  # official model's, False mmseg's.
  config.model.align_corners = True
  # Compute dtype: 'auto' is bfloat16 on TPU and float32 elsewhere; parameters and optimiser
  # state stay float32 whatever this says (the original trains in float32).
  config.model.dtype = 'auto'

  # Data: psp_jax.data.
  config.data = ml_collections.ConfigDict()
  config.data.name = 'ade20k'  # synthetic | ade20k | voc2012 | cityscapes | list | folder
  config.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir
  config.data.root = ml_collections.config_dict.placeholder(str)  # for 'list' / 'folder'
  config.data.train_list = ml_collections.config_dict.placeholder(str)  # train_list
  config.data.val_list = ml_collections.config_dict.placeholder(str)  # val_list
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.num_classes = 150  # classes: 150
  config.data.ignore_label = 255  # ignore_label: 255
  config.data.crop_size = 473  # train_h / train_w: 473
  config.data.scale_range = (0.5, 2.0)  # scale_min / scale_max
  config.data.rotate_range = (-10.0, 10.0)  # rotate_min / rotate_max
  config.data.blur = True  # RandomGaussianBlur
  config.data.flip = True  # RandHorizontalFlip
  # Training augmentation: 'official' (hszhao/semseg: the four keys above) or 'mmseg'
  # (psp_jax.data.mmseg_augment: RandomResize of data.mmseg.scale by a ratio in scale_range,
  # RandomCrop with cat_max_ratio, RandomFlip (flip), PhotoMetricDistortion; rotate_range
  # None and blur False).
  config.data.recipe = 'official'
  config.data.mmseg = ml_collections.ConfigDict()
  config.data.mmseg.scale = (2048, 512)  # RandomResize scale (long, short) at ratio 1
  config.data.mmseg.cat_max_ratio = 0.75  # RandomCrop re-draws while a class covers more
  config.data.mmseg.photometric = True  # PhotoMetricDistortion
  # Padding of crops smaller than crop_size (bottom / right): 'mean' (SegDataPreProcessor,
  # and the 0.x configs that trained the zoo) or 'black' (1.x's VOC config).
  config.data.mmseg.pad = 'mean'
  config.data.shuffle_buffer = 2_000
  # Training images from the pipeline to the devices: 'float32', normalised on the host (the
  # original's numbers), or 'uint8', the augmented image rounded to 0..255 and normalised in
  # the train step: a quarter of the bytes, values within 0.5 / 255 of the float32 ones.
  config.data.transfer_dtype = 'float32'
  # tf.data emits examples in order: the same seed gives the same batches, and a resumed run
  # is bit for bit the run it continues. False lets finished examples overtake slow ones (a
  # little more throughput when decode costs vary; the order then depends on thread timing).
  config.data.deterministic = True
  config.data.skip_bad_examples = False  # count and skip corrupt files instead of failing
  # name == 'synthetic' only: the generated data set (psp_jax.data.synthetic), prepared into
  # data_dir on first use; each combination of these values is its own TFDS config.
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.image_size = 129  # square images, pixels
  config.data.synthetic.num_train = 2_000
  config.data.synthetic.num_val = 200
  config.data.synthetic.seed = 0

  # Optimisation.
  config.optim = ml_collections.ConfigDict()
  config.optim.base_lr = 0.01  # base_lr: 0.01
  config.optim.momentum = 0.9  # momentum: 0.9
  config.optim.weight_decay = 1e-4  # weight_decay: 0.0001 (coupled, as torch.optim.SGD)
  config.optim.power = 0.9  # power: 0.9 (poly schedule)
  config.optim.min_lr = 0.0  # where the poly decay ends: 0 (official); mmseg 1e-4
  config.optim.head_lr_mult = 10.0  # ppm, cls, aux at 10x (tool/train.py param groups)
  config.optim.warmup_steps = 0
  config.optim.grad_accum_steps = 1
  config.optim.aux_weight = 0.4  # aux_weight: 0.4
  # The loss is the mean over labelled pixels within each of loss_groups equal slices of the
  # batch, averaged over slices. The original averages 8 per-GPU means (DDP averages the
  # gradients of each GPU's CrossEntropyLoss on 2 images): 8 reproduces that exactly on any
  # number of devices; 1 is the mean over all labelled pixels of the global batch.
  config.optim.loss_groups = 1
  # What each group's summed loss is divided by: 'labelled' (its labelled pixels, as
  # torch.nn.CrossEntropyLoss(ignore_index=255): the original) or 'all' (all its pixels,
  # ignored and padded ones counting as 0: mmseg's CrossEntropyLoss, avg_non_ignore=False).
  config.optim.loss_normalization = 'labelled'
  # A step whose loss or gradient is NaN or infinite never changes the weights. False stops
  # the run there with a message naming the step (the last checkpoint is kept); True skips
  # such steps and counts them (train/skipped_steps in TensorBoard).
  config.optim.skip_nonfinite_steps = False

  config.batch_size = 16  # batch_size: 16 (global, over all devices of all hosts)
  # Devices each image is split over along its height (mesh axis 'space'; the batch is on
  # 'data' over devices / spatial_partitions). 1: data parallel only. More lets a slice of
  # more devices than batch_size train the recipe's batch, or a crop too large for a device
  # train at all; BatchNorm statistics stay over the whole batch (docs/tpu.md).
  config.spatial_partitions = 1
  config.num_epochs = 100  # epochs: 100
  config.num_train_steps = -1  # > 0 overrides num_epochs
  # Weights to start from (matching names and shapes are copied, the rest stays fresh), e.g.
  # the ImageNet backbone resnet50_v2.pth the original starts from (PSPNet(pretrained=True));
  # anything psp_jax.weights.load_variables reads.
  config.init_checkpoint = ml_collections.config_dict.placeholder(str)

  # Logging, validation and checkpoints.
  config.log_every_steps = 20
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 1_000
  config.keep_checkpoints = 3
  config.num_summary_images = 4

  # Evaluation protocol (tool/test.py); see psp_jax.evaluate.
  config.eval = ml_collections.ConfigDict()
  config.eval.mode = 'slide'  # 'slide' (official) or 'whole'
  config.eval.base_size = 512  # base_size: 512
  config.eval.scales = (1.0,)  # scales: [1.0]; multi-scale [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
  config.eval.flip = True  # official single scale already averages with the flip
  config.eval.protocol = 'official'  # 'official' (mean over all classes) or 'mmseg'
  # How the image is resized: 'long_side' (tool/test.py: long side round(scale * base_size))
  # or 'fit' (mmseg's Resize keep_ratio: as large as fits fit_scale = (long, short) edges).
  config.eval.resize = 'long_side'
  config.eval.fit_scale = (2048, 512)  # mmseg test scale; Cityscapes (2048, 1024)
  config.eval.stride = 0  # slide stride in pixels (mmseg's test_cfg); 0 = ceil(crop * 2/3)
  # Slide windows clipped to the image, never padded (mmseg: an image smaller than the crop
  # runs whole at its own size); False pads it to the crop with the mean colour (official).
  config.eval.clip_windows = False
  # What overlapping windows average and the resize back interpolates: 'probs' (official:
  # softmax) or 'logits' (mmseg).
  config.eval.average = 'probs'
  config.eval.batch_size = 8  # windows per device step, global
  config.eval.max_examples = -1  # > 0 evaluates on a prefix of the split
  config.eval.whole_multiple = 64  # 'whole' mode and in-training validation pad to multiples
  config.eval.tile_size = (
    512  # psp_jax.inference.sliding_window: side of the tiles resized back at once
  )

  # A typo in a derived config (`config.optim.base_lrr = ...`) then fails instead of adding
  # a key nobody reads; existing keys stay assignable.
  config.lock()
  return config


def upgrade(stored: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The config a stored one (a training workdir's config.json) means today.

  Keys it lacks (added to the schema after it was written) take their defaults; the values
  it has are kept as stored (tuples as JSON lists).

  Raises:
    errors.InvalidInputError: naming a key the schema does not declare.
  """
  config = get_config()
  with config.ignore_type():  # e.g. crop_size, an int here, may be a pair (configs/mmseg_*).
    _overlay(config, stored, '')
  return config


def _overlay(section: ml_collections.ConfigDict, stored: Mapping[str, Any], prefix: str) -> None:
  for key, value in stored.items():
    name = f'config.{prefix}{key}'
    if key not in section:
      if prefix.rstrip('.') not in OPEN_SECTIONS:
        raise errors.InvalidInputError(
          f'{name}: no such key (psp_jax/config_schema.py declares every key).'
        )
      with section.unlocked():
        section[key] = value
    elif isinstance(section[key], ml_collections.ConfigDict):
      if not isinstance(value, Mapping):
        raise errors.InvalidInputError(f'{name}: a section, got {value!r}.')
      _overlay(section[key], value, f'{prefix}{key}.')
    else:
      section[key] = value
