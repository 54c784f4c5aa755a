"""PSPNet: dilated ResNet, Pyramid Pooling Module, cls and aux heads (hszhao/semseg)."""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from psp_jax.models.layers import TORCH_DEFAULT_KERNEL_INIT, BatchNorm, Conv
from psp_jax.models.ops import adaptive_avg_pool2d, adaptive_max_pool2d, resize_bilinear
from psp_jax.models.resnet import ModuleDef, ResNet, check_resnet_args

POOLS = {'avg': adaptive_avg_pool2d, 'max': adaptive_max_pool2d}


def _layers(
  bn_momentum: float, bn_epsilon: float, dtype: Any, param_dtype: Any
) -> tuple[ModuleDef, ModuleDef]:
  """(conv, norm) constructors of the new (non-backbone) modules."""
  # pspnet.py never re-initialises its PPM/cls/aux convs: they keep nn.Conv2d's default.
  conv = functools.partial(
    Conv, kernel_init=TORCH_DEFAULT_KERNEL_INIT, dtype=dtype, param_dtype=param_dtype
  )
  norm = functools.partial(
    BatchNorm, momentum=bn_momentum, epsilon=bn_epsilon, dtype=dtype, param_dtype=param_dtype
  )
  return conv, norm


class PyramidBranch(nn.Module):
  """One PPM bin: adaptive pool -> conv1x1 -> BN -> ReLU -> upsample to the input size."""

  bin: int
  features: int
  pool: str
  conv: ModuleDef
  norm: ModuleDef
  align_corners: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    y = POOLS[self.pool](x, self.bin)
    y = self.conv(self.features, 1, name='conv')(y)
    y = nn.relu(self.norm(name='bn')(y, train=train))
    # F.interpolate(..., mode='bilinear', align_corners=True) in PPM.forward (mmseg: False).
    return resize_bilinear(y, x.shape[1:3], align_corners=self.align_corners)


class PyramidPooling(nn.Module):
  """Pyramid Pooling Module: [x, branch_1(x), ..., branch_K(x)] on channels, input first.

  Attributes:
    bins: output side of each branch's adaptive pool, (1, 2, 3, 6) in the paper.
    pool: 'avg' or 'max' adaptive pooling (paper Table 1).
    reduce_dim: 1x1 conv to in_channels // len(bins) per branch (int(fea_dim / len(bins)) of
      pspnet.py); False keeps in_channels per branch (the paper's ablation).
    bn_momentum: BatchNorm momentum, Flax convention (0.9 == torch's 0.1).
    bn_epsilon: BatchNorm epsilon.
    dtype: compute dtype.
    param_dtype: parameter dtype.
    align_corners: of each branch's upsampling (True official, False mmseg).
  """

  bins: Sequence[int] = (1, 2, 3, 6)
  pool: str = 'avg'
  reduce_dim: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  align_corners: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Pyramid features of a feature map.

    Args:
      x: [B, h, w, C] features (layer4).
      train: batch statistics (and their running update) instead of the running ones.

    Returns:
      [B, h, w, C + len(bins) * D], D = C // len(bins) (reduce_dim) or C.
    """
    check_ppm_args(self.bins, self.pool)
    conv, norm = _layers(self.bn_momentum, self.bn_epsilon, self.dtype, self.param_dtype)
    in_features = x.shape[-1]
    features = in_features // len(self.bins) if self.reduce_dim else in_features
    x = x.astype(self.dtype)
    outs = [x]
    for k, b in enumerate(self.bins):
      branch = PyramidBranch(
        int(b), features, self.pool, conv, norm, self.align_corners, name=str(k)
      )
      outs.append(branch(x, train=train))
    return jnp.concatenate(outs, axis=-1)


def check_ppm_args(bins: Sequence[int], pool: str) -> None:
  """Raises ValueError naming the bad PPM argument."""
  if pool not in POOLS:
    raise ValueError(f'pool={pool!r}: expected one of {sorted(POOLS)}.')
  if len(bins) == 0 or not all(int(b) == b and b >= 1 for b in bins):
    raise ValueError(f'bins={bins!r}: expected a non-empty sequence of positive ints.')


class Head(nn.Module):
  """conv3x3 -> BN -> ReLU -> Dropout2d -> conv1x1 (+bias): the original's cls and aux."""

  features: int
  num_classes: int
  dropout_rate: float
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = self.conv(self.features, 3, name='conv1')(x)
    x = nn.relu(self.norm(name='bn1')(x, train=train))
    # nn.Dropout2d: one Bernoulli draw per (image, channel), broadcast over H and W.
    x = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), name='dropout')(
      x, deterministic=not train
    )
    return self.conv(self.num_classes, 1, use_bias=True, name='conv2')(x)


class PSPNet(nn.Module):
  """Pyramid Scene Parsing Network (Zhao et al., CVPR 2017), model/pspnet.py in Flax.

  Parameter names follow the official state_dict (backbone/layer0..layer4, ppm, cls, aux),
  so psp_jax.convert is a rename and a transpose. Per-stage activations are sown into
  'intermediates' as layer0..layer4, ppm, cls and (train only) aux.

  Attributes:
    num_classes: output classes (150 for ADE20K).
    depth: ResNet depth, 18/34/50/101/152.
    stem: 'deep' (official), 'deep_v1c' (mmseg's ResNetV1c: 3x3 convs of w/2, w/2, w) or
      'classic' (7x7) ResNet stem.
    output_stride: 8 (official), 16 or 32.
    contract_dilation: block 0 of each dilated stage at half its dilation (mmseg's
      ResNetV1c: layer3 block 0 at 1, layer4 block 0 at 2 for output stride 8).
    width: backbone width, 64 for the real ResNet (scales every backbone channel).
    bins: PPM bins.
    pool: 'avg' or 'max' PPM pooling.
    use_ppm: False feeds layer4 straight to cls (the dilated-FCN baseline).
    reduce_dim: PPM branches reduce to in_channels // len(bins) channels.
    head_channels: width of cls's 3x3 conv.
    aux_channels: width of aux's 3x3 conv.
    dropout_rate: Dropout2d probability in cls and aux.
    align_corners: of every bilinear resize, the pyramid branches' and the final one to the
      input size (True official, False mmseg).
    bn_momentum: BatchNorm momentum, Flax convention (0.9 == torch's 0.1).
    bn_epsilon: BatchNorm epsilon.
    dtype: compute dtype (bfloat16 keeps float32 parameters and returns float32 logits).
    param_dtype: parameter dtype (float64 for parity tests).
  """

  num_classes: int
  depth: int = 50
  stem: str = 'deep'
  output_stride: int = 8
  contract_dilation: bool = False
  width: int = 64
  bins: Sequence[int] = (1, 2, 3, 6)
  pool: str = 'avg'
  use_ppm: bool = True
  reduce_dim: bool = True
  head_channels: int = 512
  aux_channels: int = 256
  dropout_rate: float = 0.1
  align_corners: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Per-pixel class logits at the input size.

    Args:
      images: [B, H, W, 3] ImageNet-normalised RGB, any H, W.
      train: batch statistics, dropout (rng 'dropout') and the aux head.

    Returns:
      eval: logits [B, H, W, num_classes]; train: (logits, aux_logits), both that shape.
      float32 (float64 if dtype is float64), upsampled bilinearly to H, W (align_corners as
      the attribute says).
    """
    self._check(images)
    check_resnet_args(self.depth, self.stem, self.output_stride, self.width)
    if self.use_ppm:
      check_ppm_args(self.bins, self.pool)
    size = images.shape[1:3]
    out_dtype = jnp.promote_types(self.dtype, jnp.float32)
    bn_kw = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon)
    dt_kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    feats = ResNet(
      depth=self.depth,
      stem=self.stem,
      output_stride=self.output_stride,
      width=self.width,
      contract_dilation=self.contract_dilation,
      **bn_kw,
      **dt_kw,
      name='backbone',
    )(images, train=train)
    for name, value in feats.items():
      self._sow(name, value)

    x = feats['layer4']
    if self.use_ppm:
      ppm = PyramidPooling(
        self.bins,
        self.pool,
        self.reduce_dim,
        **bn_kw,
        **dt_kw,
        align_corners=self.align_corners,
        name='ppm',
      )
      x = ppm(x, train=train)
      self._sow('ppm', x)
    conv, norm = _layers(self.bn_momentum, self.bn_epsilon, self.dtype, self.param_dtype)
    head = functools.partial(
      Head, num_classes=self.num_classes, dropout_rate=self.dropout_rate, conv=conv, norm=norm
    )
    logits = head(self.head_channels, name='cls')(x, train=train)
    self._sow('cls', logits)
    # F.interpolate(x, size=(h, w), mode='bilinear', align_corners=True) in PSPNet.forward
    # (mmseg: resize to the input size with align_corners=False; both at any size); done in
    # float32 so reduced-precision compute still gives float32 logits.
    logits = resize_bilinear(logits.astype(out_dtype), size, align_corners=self.align_corners)

    # The aux head's parameters exist whatever `train` says at init (a checkpoint always has
    # them), but it only runs when training, as `if self.training` in PSPNet.forward.
    if train or self.is_initializing():
      aux = head(self.aux_channels, name='aux')(feats['layer3'], train=train)
      if train:
        self._sow('aux', aux)
        aux = resize_bilinear(aux.astype(out_dtype), size, align_corners=self.align_corners)
        return logits, aux
    return logits

  def _sow(self, name: str, value: jax.Array) -> None:
    """Stores ('intermediates', name) = (value,) when that collection is mutable.

    The layout of self.sow, but self.sow would also reserve the name in this scope, and
    'ppm', 'cls' and 'aux' are already the names of submodules (Flax raises "Duplicate use of
    scope name"); those submodules never write 'intermediates' themselves, so the flat keys
    cannot collide. With capture_intermediates=True the captures inside ppm, cls and aux are
    replaced by these entries (the backbone's stay under 'backbone').
    """
    if self.is_mutable_collection('intermediates'):
      self.put_variable('intermediates', name, (value,))

  def _check(self, images: jax.Array) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
      hint = ''
      if images.ndim == 4 and images.shape[1] == 3:
        hint = ' This looks like NCHW: transpose with images.transpose(0, 2, 3, 1).'
      raise ValueError(
        f'PSPNet expects images [B, H, W, 3] (NHWC, ImageNet-normalised RGB), got shape '
        f'{tuple(images.shape)}.{hint}'
      )
    if self.num_classes < 1:
      raise ValueError(f'PSPNet num_classes={self.num_classes!r}: expected a positive int.')
