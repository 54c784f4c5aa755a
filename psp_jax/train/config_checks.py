"""Checks of a training config, run before anything is built, and the values derived from it.

Every message names the config key at fault and how to fix it, so a bad run stops in a
second instead of after minutes of compilation.
"""

from typing import Any

import ml_collections

from psp_jax import config_schema, errors, sizes
from psp_jax.data import normalization
from psp_jax.models import codec, resnet
from psp_jax.train import losses

# config.data belongs to the data pipeline (psp_jax.data) and config.eval's values to the
# inference (psp_jax.inference.planning), which check their own keys; model keys are PSPNet's
# constructor arguments (psp_jax.models.codec).
_DEFAULTS = config_schema.get_config()
TOP_KEYS = frozenset(_DEFAULTS.keys())
OPTIM_KEYS = frozenset(_DEFAULTS.optim.keys())
EVAL_KEYS = frozenset(_DEFAULTS.eval.keys())
DATA_REQUIRED = ('name', 'num_classes', 'ignore_label', 'crop_size', 'train_split', 'eval_split')


class ConfigError(errors.UserError, ValueError):
  """A config value that cannot work; the message names the key."""


def _unknown(section: Any, known: frozenset[str], prefix: str) -> None:
  unknown = sorted(set(section.keys()) - known)
  if unknown:
    names = ', '.join(f'{prefix}{k}' for k in unknown)
    raise ConfigError(
      f'Unknown config key(s): {names}. Known {prefix or "top-level "}keys: {sorted(known)}. '
      'Check the spelling (psp_jax/config_schema.py declares every key).'
    )


def crop_pair(crop_size: Any) -> tuple[int, int]:
  """(height, width) of config.data.crop_size (an int or a pair)."""
  try:
    return sizes.pair(crop_size, 'config.data.crop_size')
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check(condition: bool, key: str, message: str) -> None:
  if not condition:
    raise ConfigError(f'config.{key}: {message}')


def validate(config: ml_collections.ConfigDict, *, device_count: int, process_count: int) -> None:
  """Raises ConfigError, naming the key, for a config that cannot train.

  Args:
    config: the full training config.
    device_count: devices over all processes (jax.device_count()).
    process_count: processes (jax.process_count()).
  """
  _unknown(config, TOP_KEYS, '')
  for section in ('model', 'data', 'optim', 'eval'):
    _check(section in config, section, 'missing section; start from configs/default.py.')
  _unknown(config.model, codec.settable_keys() | {'dtype'}, 'model.')
  _unknown(config.optim, OPTIM_KEYS, 'optim.')
  _unknown(config.eval, EVAL_KEYS, 'eval.')
  for key in DATA_REQUIRED:
    _check(key in config.data, f'data.{key}', 'missing; configs/default.py sets it.')

  model, data, optim = config.model, config.data, config.optim
  dtypes = codec.DTYPES
  _check(model.dtype in dtypes, 'model.dtype', f'must be one of {dtypes}.')
  _check_model_variant(model)
  _check(
    data.transfer_dtype in normalization.TRANSFER_DTYPES,
    'data.transfer_dtype',
    f'must be one of {normalization.TRANSFER_DTYPES}, got {data.transfer_dtype!r}.',
  )
  _check(data.num_classes >= 1, 'data.num_classes', f'must be >= 1, got {data.num_classes}.')
  _check(
    not 0 <= data.ignore_label < data.num_classes,
    'data.ignore_label',
    f'{data.ignore_label} is a real class (num_classes {data.num_classes}); use 255.',
  )

  accum = optim.grad_accum_steps
  _check(accum >= 1, 'optim.grad_accum_steps', f'must be >= 1, got {accum}.')
  _check(config.batch_size >= 1, 'batch_size', f'must be >= 1, got {config.batch_size}.')
  space = config.spatial_partitions
  local = device_count // process_count
  _check(
    isinstance(space, int) and space >= 1 and device_count % space == 0,
    'spatial_partitions',
    f'must be a positive int dividing the {device_count} devices, got {space!r}.',
  )
  _check(
    local % space == 0 or space % local == 0,
    'spatial_partitions',
    f'{space} must divide, or be a multiple of, the {local} devices of each process.',
  )
  data_devices = device_count // space
  split = f' ({device_count} / spatial_partitions {space})' if space > 1 else ''
  _check(
    config.batch_size % (accum * data_devices) == 0,
    'batch_size',
    f'{config.batch_size} is not divisible by {data_devices} devices{split} x '
    f'{accum} optim.grad_accum_steps; use a multiple of {accum * data_devices}'
    + (', or split each image over devices (config.spatial_partitions).' if space == 1 else '.'),
  )
  micro = config.batch_size // accum
  groups = optim.loss_groups
  _check(
    groups >= 1 and micro % groups == 0,
    'optim.loss_groups',
    f'{groups} must divide the batch of each gradient step ({micro} = batch_size / '
    'grad_accum_steps).',
  )
  bins = model.bins
  _check(
    _positive_numbers(bins, int),
    'model.bins',
    f'must be a tuple of positive ints, e.g. (1, 2, 3, 6), got {bins!r} (on the command '
    "line: --config.model.bins='(1, 2, 3, 6)').",
  )
  bins = tuple(bins)
  if model.use_ppm and 1 in bins:
    # The bin-1 branch's BatchNorm sees one value per channel and image; torch refuses a
    # batch of one ("Expected more than 1 value per channel when training") and the
    # unbiased running variance n / (n - 1) would divide by zero.
    _check(
      micro >= 2,
      'batch_size',
      f'each gradient step needs >= 2 images for the PPM bin-1 BatchNorm, got {micro}.',
    )

  crop = crop_pair(data.crop_size)
  smallest = codec.min_input_side(model)
  if min(crop) < smallest:
    stride = model.output_stride
    feature = min(codec.feature_side(c, stride) for c in crop)
    raise ConfigError(
      f'config.data.crop_size: {data.crop_size} is too small: it gives a {feature}-pixel '
      f'feature map at output_stride {stride}, fewer cells than the largest pyramid bin '
      f'({max(bins)}) (a finer bin would only repeat cells). Use a crop of at least {smallest}.'
    )

  _check(optim.base_lr > 0, 'optim.base_lr', f'must be > 0, got {optim.base_lr}.')
  _check(0 <= optim.momentum < 1, 'optim.momentum', f'must be in [0, 1), got {optim.momentum}.')
  _check(optim.weight_decay >= 0, 'optim.weight_decay', 'must be >= 0.')
  _check(optim.head_lr_mult > 0, 'optim.head_lr_mult', 'must be > 0.')
  _check(optim.warmup_steps >= 0, 'optim.warmup_steps', 'must be >= 0.')
  _check(
    0 <= optim.min_lr < optim.base_lr,
    'optim.min_lr',
    f'must be in [0, optim.base_lr = {optim.base_lr}), got {optim.min_lr}.',
  )
  _check(optim.aux_weight >= 0, 'optim.aux_weight', 'must be >= 0.')
  _check(
    optim.loss_normalization in losses.NORMALIZATIONS,
    'optim.loss_normalization',
    f"{optim.loss_normalization!r} must be one of {losses.NORMALIZATIONS} ('all' is mmseg's).",
  )
  _check(
    config.num_train_steps > 0 or config.num_epochs > 0,
    'num_train_steps',
    'set num_train_steps > 0 or num_epochs > 0.',
  )
  for key in ('log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
    _check(config[key] >= 1, key, f'must be >= 1, got {config[key]}.')
  _check(config.keep_checkpoints >= 1, 'keep_checkpoints', 'must be >= 1.')
  _check(
    config.eval.batch_size >= 1 and config.eval.batch_size % device_count == 0,
    'eval.batch_size',
    f'{config.eval.batch_size} is not a positive multiple of the {device_count} devices.',
  )


def _check_model_variant(model: ml_collections.ConfigDict) -> None:
  """config.model.stem, contract_dilation and align_corners (official vs mmseg network)."""
  stem, width = model.stem, model.width
  _check(stem in resnet.STEMS, 'model.stem', f'{stem!r} must be one of {resnet.STEMS}.')
  _check(
    stem != 'deep_v1c' or width % 2 == 0,
    'model.width',
    f"{width} must be even with stem='deep_v1c' (its first convs have width / 2 channels).",
  )
  for key in ('contract_dilation', 'align_corners'):
    value = model[key]
    _check(isinstance(value, bool), f'model.{key}', f'must be True or False, got {value!r}.')


def _positive_numbers(value: Any, kind: type) -> bool:
  """Whether value is a non-empty tuple or list of positive numbers of `kind` (int or float)."""
  if not isinstance(value, tuple | list) or not value:
    return False
  kinds = (int,) if kind is int else (int, float)
  return all(isinstance(v, kinds) and not isinstance(v, bool) and v > 0 for v in value)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Optimiser steps in one epoch (the last partial batch is dropped, drop_last=True)."""
  return num_examples // batch_size


def num_train_steps(config: ml_collections.ConfigDict, num_train_examples: int | None) -> int:
  """config.num_train_steps if > 0, else num_epochs full epochs (max_iter in tool/train.py)."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  if num_train_examples is None:
    raise ConfigError(
      'config.num_epochs needs the number of training examples; set config.num_train_steps instead.'
    )
  per_epoch = steps_per_epoch(num_train_examples, config.batch_size)
  if per_epoch < 1:
    raise ConfigError(
      f'config.batch_size: {config.batch_size} is larger than the training split '
      f'({num_train_examples} examples).'
    )
  return int(config.num_epochs) * per_epoch
