"""The model config: PSPNet keyword arguments as JSON, the compute-dtype rule, build_model.

A model config is the dict of PSPNet keyword arguments that every checkpoint carries
(model_config.json, or the model_config item of a training checkpoint): JSON types only,
dtypes as names, tuples as lists. It is written and read through `encode` and `build_model`
alone, so a checkpoint, a converted weights directory and a training run agree on it.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from psp_jax.models.pspnet import PSPNet

# config.model.dtype values. 'auto' is resolved when a model is built: bfloat16 on TPU (its
# matrix units' native type), float32 elsewhere (CPU and GPU parity runs).
DTYPES = ('auto', 'float32', 'bfloat16', 'float16')
_DTYPE_KEYS = ('dtype', 'param_dtype')


def compute_dtype(name: str, platform: str) -> jnp.dtype:
  """The compute dtype of a config.model.dtype name; 'auto' is bfloat16 on TPU, else float32.

  Args:
    name: one of DTYPES.
    platform: 'cpu', 'gpu' or 'tpu' (jax.devices()[0].platform).
  """
  if name == 'auto':
    name = 'bfloat16' if platform == 'tpu' else 'float32'
  return jnp.dtype(name)


def settable_keys() -> frozenset[str]:
  """PSPNet's constructor arguments a config may set (num_classes comes from config.data)."""
  fields = {f.name for f in dataclasses.fields(PSPNet) if f.init}
  return frozenset(fields - {'parent', 'name', 'num_classes'})


def defaults() -> dict[str, Any]:
  """PSPNet's constructor defaults, encoded: what a model config without a key means (one
  written before the key existed, e.g. contract_dilation and align_corners)."""
  fields = [f for f in dataclasses.fields(PSPNet) if f.name in settable_keys()]
  return encode({f.name: f.default for f in fields if f.default is not dataclasses.MISSING})


def feature_side(side: int, output_stride: int) -> int:
  """Side of layer4's feature map for an input side (each stride-2 stage rounds up)."""
  for _ in range(round(math.log2(output_stride))):
    side = -(-side // 2)
  return side


def min_input_side(model_config: Mapping[str, Any]) -> int:
  """The smallest input side (pixels) at which the model's pyramid describes the image.

  PSPNet runs at any size, but below this side layer4 has fewer features than the pyramid
  pooling module's finest grid has cells: the adaptive pooling then repeats features. It is
  output_stride * (largest bin - 1) + 1: 41 for stride 8 and bins (1, 2, 3, 6); 1 without
  the pyramid.

  Args:
    model_config: PSPNet keyword arguments (a model config, or config.model); a key it
      lacks means PSPNet's default.
  """
  kwargs = {**defaults(), **model_config}
  largest = max(kwargs['bins']) if kwargs['use_ppm'] else 1
  return int(kwargs['output_stride']) * (int(largest) - 1) + 1


def encode(kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """PSPNet keyword arguments as JSON values: tuples as lists, dtypes as their names."""
  out = {}
  for key, value in kwargs.items():
    if key in _DTYPE_KEYS and value is not None and not isinstance(value, str):
      value = jnp.dtype(value).name
    out[key] = list(value) if isinstance(value, tuple) else value
  return out


def of_experiment(config: ml_collections.ConfigDict, platform: str) -> dict[str, Any]:
  """The model config of an experiment: config.model, data.num_classes, dtype resolved.

  Args:
    config: the run config (configs/default.py).
    platform: where the model will run ('auto' is resolved for it).
  """
  kwargs = config.model.to_dict()
  kwargs['dtype'] = compute_dtype(config.model.dtype, platform).name
  kwargs['num_classes'] = int(config.data.num_classes)
  return encode(kwargs)


def build_model(model_config: Mapping[str, Any], platform: str | None = None) -> PSPNet:
  """PSPNet from a model config (dtype names, 'auto' included; bins as a list).

  Args:
    model_config: PSPNet keyword arguments as `encode` writes them.
    platform: resolves dtype 'auto'; by default the platform JAX runs on.
  """
  kwargs = dict(model_config)
  platform = platform or jax.default_backend()
  for key in _DTYPE_KEYS:
    if isinstance(kwargs.get(key), str):
      kwargs[key] = compute_dtype(kwargs[key], platform)
  if 'bins' in kwargs:
    kwargs['bins'] = tuple(kwargs['bins'])
  return PSPNet(**kwargs)
