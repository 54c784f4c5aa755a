"""Default configuration: PSPNet-50 with the official recipe (hszhao/semseg, ADE20K yaml).

It is also the schema: every key a config may have is declared here, and
psp_jax.train.config checks configs against it. configs/*.py start from this one (through
configs/default.py) and override a few keys. Values copied from the
original name the yaml key they mirror. Any key can be overridden on the command line:

  python train.py --config configs/default.py --workdir runs/x --config.optim.base_lr=0.02
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default (ADE20K PSPNet-50) configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Model: psp_jax.models.PSPNet keyword arguments.
  config.model = ml_collections.ConfigDict()
  config.model.depth = 50  # layers: 50
  config.model.stem = 'deep'  # three 3x3 convs (the released resnet50_v2); 'classic' = 7x7
  config.model.output_stride = 8  # zoom_factor: 8 (dilated layer3/layer4)
  config.model.width = 64  # channels of layer1's bottleneck; 64 is the real ResNet
  config.model.bins = (1, 2, 3, 6)  # bins: [1, 2, 3, 6]
  config.model.pool = 'avg'  # 'avg' or 'max' (paper Table 1)
  config.model.use_ppm = True  # use_ppm: True; False gives the dilated-FCN baseline
  config.model.reduce_dim = True  # 1x1 dimension reduction in each pyramid branch
  config.model.head_channels = 512  # cls 3x3 conv width
  config.model.aux_channels = 256  # aux 3x3 conv width
  config.model.dropout_rate = 0.1  # Dropout2d(p=0.1) in cls and aux
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
  config.data.shuffle_buffer = 2_000
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
  config.optim.head_lr_mult = 10.0  # ppm, cls, aux at 10x (tool/train.py param groups)
  config.optim.warmup_steps = 0
  config.optim.grad_accum_steps = 1
  config.optim.aux_weight = 0.4  # aux_weight: 0.4
  # The loss is the mean over labelled pixels within each of loss_groups equal slices of the
  # batch, averaged over slices. The original averages 8 per-GPU means (DDP averages the
  # gradients of each GPU's CrossEntropyLoss on 2 images): 8 reproduces that exactly on any
  # number of devices; 1 is the mean over all labelled pixels of the global batch.
  config.optim.loss_groups = 1
  # A step whose loss or gradient is NaN or infinite never changes the weights. False stops
  # the run there with a message naming the step (the last checkpoint is kept); True skips
  # such steps and counts them (train/skipped_steps in TensorBoard).
  config.optim.skip_nonfinite_steps = False

  config.batch_size = 16  # batch_size: 16 (global, over all devices of all hosts)
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
