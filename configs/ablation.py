"""The paper's ablations (Zhao et al. 2017, Tables 1 and 2) on the built-in synthetic data.

  python train.py --config configs/ablation.py:b1236-max --workdir runs/ablation/b1236-max
  python benchmarks/ablation.py          # every variant x seed, writes docs/ablation.md

Each variant is configs/synthetic.py's thinned PSPNet with the model or loss change of one
row of the paper, trained for STEPS steps and validated once at the end. Without an
argument get_config gives the full PSPNet (b1236-avg-dr).

The scenes are IMAGE_SIZE pixels, twice the side of configs/synthetic.py's. The layout is
relative to the image, so every distance doubles in pixels while the network's receptive
field stays the same. What decides car against boat for a close-up's lower pixels is then
where the dilated FCN's gradient has faded (benchmarks/receptive_field.py measures both),
while PSPNet's global bins see the whole scene. At 129 pixels the FCN drew on the whole
scene and the pyramid gained nothing (docs/ablation.md).

Table 1 rows: the dilated FCN without the pyramid (baseline); one global bin (b1) or bins
(1, 2, 3, 6) (b1236); average or max pooling; with or without the 1x1 dimension reduction
of each branch (-dr). The paper's B1 rows have no reduction; with one bin it would keep all
channels anyway. Without reduction our branches keep a 1x1 conv to the full width (the
model's reduce_dim=False), so the branches differ only in their output channels.

Table 2 rows: the auxiliary loss weight, on the dilated FCN without the pyramid as in the
paper (its Table 2 and Table 4 rows are ResNet50 without PSP); the baseline row is alpha 0.4.
"""

import ml_collections

from configs import synthetic

# Steps per run, at batch 8: 8 variants x 3 seeds fit an hour on two idle cores.
STEPS = 200
IMAGE_SIZE = 257
# 193 = 8 * 24 + 1 (the official 8k + 1 shape): three quarters of the scene, as for
# configs/synthetic.py's 97 of 129, so most crops keep the ground above a close-up.
CROP_SIZE = 193
BATCH_SIZE = 8
DEFAULT_VARIANT = 'b1236-avg-dr'

# name: (model overrides, optim overrides). The model keys are psp_jax.models.PSPNet's.
VARIANTS = {
  'baseline': (dict(use_ppm=False), {}),
  'b1-max': (dict(bins=(1,), pool='max', reduce_dim=False), {}),
  'b1-avg': (dict(bins=(1,), pool='avg', reduce_dim=False), {}),
  'b1236-max': (dict(bins=(1, 2, 3, 6), pool='max', reduce_dim=False), {}),
  'b1236-avg': (dict(bins=(1, 2, 3, 6), pool='avg', reduce_dim=False), {}),
  'b1236-max-dr': (dict(bins=(1, 2, 3, 6), pool='max', reduce_dim=True), {}),
  'b1236-avg-dr': (dict(bins=(1, 2, 3, 6), pool='avg', reduce_dim=True), {}),
  'baseline-aux0': (dict(use_ppm=False), dict(aux_weight=0.0)),
  'baseline-aux0.3': (dict(use_ppm=False), dict(aux_weight=0.3)),
  'baseline-aux0.6': (dict(use_ppm=False), dict(aux_weight=0.6)),
  'baseline-aux0.9': (dict(use_ppm=False), dict(aux_weight=0.9)),
}
# Table 2's other weights: benchmarks/ablation.py runs them with --variants all.
EXTRA_VARIANTS = ('baseline-aux0.3', 'baseline-aux0.6', 'baseline-aux0.9')
# What benchmarks/ablation.py runs by default: Table 1 and alpha 0 vs 0.4.
CORE_VARIANTS = tuple(v for v in VARIANTS if v not in EXTRA_VARIANTS)


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The synthetic config with one ablation row's changes.

  Args:
    variant: a key of VARIANTS (the text after ':' in --config); None or '' for
      DEFAULT_VARIANT.

  Returns:
    The locked config; only existing keys can be overridden.
  """
  variant = variant or DEFAULT_VARIANT
  if variant not in VARIANTS:
    raise ValueError(f'Unknown ablation variant {variant!r}; known: {sorted(VARIANTS)}.')
  model, optim = VARIANTS[variant]
  config = synthetic.get_config()
  # Every variant starts from the full PSPNet's settings (configs/default.py) and changes
  # only the keys of its row.
  config.model.use_ppm = True
  config.model.bins = (1, 2, 3, 6)
  config.model.pool = 'avg'
  config.model.reduce_dim = True
  for key, value in model.items():
    config.model[key] = value
  for key, value in optim.items():
    config.optim[key] = value

  config.data.synthetic.image_size = IMAGE_SIZE
  config.data.crop_size = CROP_SIZE
  config.eval.base_size = IMAGE_SIZE  # psp_jax.evaluate: each scene whole, at its size.
  config.batch_size = BATCH_SIZE

  config.num_train_steps = STEPS
  # One validation and one checkpoint, at the end: the reported weights are the last ones.
  config.eval_every_steps = STEPS
  config.checkpoint_every_steps = STEPS
  config.keep_checkpoints = 1
  config.log_every_steps = 25
  # A seed then fixes the initialisation, the dropout and the order and augmentation of the
  # training images, so two variants with one seed see the same batches.
  config.data.deterministic = True
  return config
