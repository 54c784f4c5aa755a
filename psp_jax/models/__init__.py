"""PSPNet in Flax: the model, its dilated ResNet backbone and PyTorch-exact NHWC ops."""

from psp_jax.models.layers import BatchNorm, Conv
from psp_jax.models.ops import (
  adaptive_avg_pool2d,
  adaptive_max_pool2d,
  max_pool_3x3_s2,
  resize_bilinear,
)
from psp_jax.models.pspnet import PSPNet, PyramidPooling
from psp_jax.models.resnet import ResNet

__all__ = [
  'BatchNorm',
  'Conv',
  'PSPNet',
  'PyramidPooling',
  'ResNet',
  'adaptive_avg_pool2d',
  'adaptive_max_pool2d',
  'max_pool_3x3_s2',
  'resize_bilinear',
]
