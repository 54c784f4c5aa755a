"""Dilated ResNet backbone (18/34/50/101/152) with the official semseg names and geometry."""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from psp_jax.models.layers import BatchNorm, Conv
from psp_jax.models.ops import max_pool_3x3_s2

ModuleDef = Callable[..., nn.Module]

# Block type and blocks per stage: resnet18/34/50/101/152 of model/resnet.py.
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
  18: ('basic', (2, 2, 2, 2)),
  34: ('basic', (3, 4, 6, 3)),
  50: ('bottleneck', (3, 4, 6, 3)),
  101: ('bottleneck', (3, 4, 23, 3)),
  152: ('bottleneck', (3, 8, 36, 3)),
}
EXPANSION = {'basic': 1, 'bottleneck': 4}
# (stride, dilation) of layer3 and layer4 per output stride. For 8 the original's PSPNet
# patches every layer3/layer4 conv2 to dilation 2/4 (padding = dilation) and stride 1, and
# the downsample conv to stride 1 (model/pspnet.py); here they are constructor arguments.
STAGE_GEOMETRY: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {
  8: ((1, 2), (1, 4)),
  16: ((2, 1), (1, 2)),
  32: ((2, 1), (2, 1)),
}
# 'deep': conv3x3 widths (w, w, 2w), the official resnet50_v2; 'deep_v1c': (w/2, w/2, w),
# mmsegmentation's ResNetV1c (stem_channels = w); 'classic': one 7x7 conv of w (torchvision).
STEMS = ('deep', 'deep_v1c', 'classic')
STAGES = ('layer0', 'layer1', 'layer2', 'layer3', 'layer4')


def check_resnet_args(depth: int, stem: str, output_stride: int, width: int) -> None:
  """Raises ValueError naming the argument and its allowed values."""
  if depth not in DEPTHS:
    raise ValueError(f'ResNet depth={depth!r}: expected one of {sorted(DEPTHS)}.')
  if stem not in STEMS:
    raise ValueError(f'ResNet stem={stem!r}: expected one of {STEMS}.')
  if output_stride not in STAGE_GEOMETRY:
    raise ValueError(
      f'ResNet output_stride={output_stride!r}: expected one of {sorted(STAGE_GEOMETRY)}.'
    )
  if not isinstance(width, int) or width < 1:
    raise ValueError(f'ResNet width={width!r}: expected a positive int (64 is the real ResNet).')
  if stem == 'deep_v1c' and width % 2:
    raise ValueError(f"ResNet width={width}: stem='deep_v1c' halves it; expected an even width.")


def stem_channels(stem: str, width: int) -> tuple[int, ...]:
  """Output channels of each stem conv: (w, w, 2w), (w/2, w/2, w) or (w,) (classic)."""
  return {'deep': (width, width, 2 * width), 'deep_v1c': (width // 2, width // 2, width)}.get(
    stem, (width,)
  )


def first_block_dilation(dilation: int, contract_dilation: bool) -> int:
  """Dilation of a stage's block 0: mmseg's ResLayer halves it when contracting (d > 1)."""
  return dilation // 2 if contract_dilation and dilation > 1 else dilation


def stage_channels(depth: int, width: int) -> tuple[int, int, int, int]:
  """Output channels of layer1..layer4 (2048 for layer4 of ResNet-50 at width 64)."""
  expansion = EXPANSION[DEPTHS[depth][0]]
  return tuple(width * 2**s * expansion for s in range(4))


class Downsample(nn.Module):
  """Projection shortcut: conv1x1 (stride) + BN, the original's downsample Sequential."""

  features: int
  stride: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = self.conv(self.features, 1, stride=self.stride, name='conv')(x)
    return self.norm(name='bn')(x, train=train)


class BasicBlock(nn.Module):
  """3x3 (stride, dilation) -> 3x3 (dilation) residual block of ResNet-18/34.

  The original's PSPNet only takes bottleneck ResNets; dilating both 3x3 convs (and moving
  the stride to 1) is the natural extension, as mmsegmentation's dilated ResNet-18 does.
  """

  planes: int
  stride: int
  dilation: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    s, d = self.stride, self.dilation
    y = self.conv(self.planes, 3, stride=s, dilation=d, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y, train=train))
    y = self.conv(self.planes, 3, dilation=d, name='conv2')(y)
    y = self.norm(name='bn2')(y, train=train)
    shortcut = x
    if s != 1 or x.shape[-1] != self.planes:
      shortcut = Downsample(self.planes, s, self.conv, self.norm, name='downsample')(x, train=train)
    return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4) residual block, stride on the 3x3 (v1.5)."""

  planes: int
  stride: int
  dilation: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    s, d = self.stride, self.dilation
    out = self.planes * EXPANSION['bottleneck']
    y = self.conv(self.planes, 1, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y, train=train))
    y = self.conv(self.planes, 3, stride=s, dilation=d, name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y, train=train))
    y = self.conv(out, 1, name='conv3')(y)
    y = self.norm(name='bn3')(y, train=train)
    shortcut = x
    # Block 0 of every stage projects, layer1 included (its input has 2*width or width
    # channels, never 4*width): _make_layer's `stride != 1 or inplanes != planes * 4`.
    if s != 1 or x.shape[-1] != out:
      shortcut = Downsample(out, s, self.conv, self.norm, name='downsample')(x, train=train)
    return nn.relu(y + shortcut)


class Stem(nn.Module):
  """layer0: deep (three 3x3 convs, as resnet50_v2) or classic (one 7x7 conv), then max-pool.

  Deep: conv3x3 s2 (3 -> w), BN, ReLU, conv3x3 (w -> w), BN, ReLU, conv3x3 (w -> 2w), BN,
  ReLU. deep_v1c: the same with widths w/2, w/2, w (mmseg's ResNetV1c). Classic: conv7x7 s2
  pad 3 (3 -> w), BN, ReLU (torchvision's conv1/bn1). All end with nn.MaxPool2d(3, stride=2,
  padding=1).
  """

  stem: str
  width: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    kernel = 7 if self.stem == 'classic' else 3
    for i, features in enumerate(stem_channels(self.stem, self.width), start=1):
      stride = 2 if i == 1 else 1
      x = self.conv(features, kernel, stride=stride, name=f'conv{i}')(x)
      x = nn.relu(self.norm(name=f'bn{i}')(x, train=train))
    return max_pool_3x3_s2(x)


class ResLayer(nn.Module):
  """One stage (layer1..layer4): blocks named '0', '1', ... as in the torch Sequential.

  contract_dilation: block 0 at half the stage's dilation (mmseg), else at all of it.
  """

  kind: str
  planes: int
  num_blocks: int
  stride: int
  dilation: int
  conv: ModuleDef
  norm: ModuleDef
  contract_dilation: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    block = Bottleneck if self.kind == 'bottleneck' else BasicBlock
    for i in range(self.num_blocks):
      # Only block 0 strides; every block of the stage has the stage's dilation (the
      # original patches all conv2 of layer3/layer4, block 0 included) unless contracted.
      stride, dilation = self.stride, first_block_dilation(self.dilation, self.contract_dilation)
      if i > 0:
        stride, dilation = 1, self.dilation
      x = block(self.planes, stride, dilation, self.conv, self.norm, name=str(i))(x, train=train)
    return x


class ResNet(nn.Module):
  """Dilated ResNet without its classifier: the stages layer0..layer4 of model/resnet.py.

  Attributes:
    depth: 18, 34 (basic blocks), 50, 101, 152 (bottlenecks).
    stem: 'deep' (three 3x3 convs, the official PSPNet weights), 'deep_v1c' (mmseg's
      ResNetV1c: the same convs at half width) or 'classic' (7x7, torchvision's conv1/bn1).
    output_stride: 8 (layer3 dilation 2, layer4 dilation 4, both stride 1), 16 (layer4
      dilation 2, stride 1) or 32 (plain ResNet).
    contract_dilation: block 0 of a dilated stage at half its dilation (mmseg's ResNet).
    width: channels of layer1's 3x3 conv; every channel count scales with it (64 = real).
    bn_momentum: BatchNorm momentum, Flax convention (0.9 == torch's 0.1).
    bn_epsilon: BatchNorm epsilon.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  depth: int = 50
  stem: str = 'deep'
  output_stride: int = 8
  width: int = 64
  contract_dilation: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """Stage outputs of an image batch.

    Args:
      x: [B, H, W, 3] images.
      train: batch statistics (and their running update) instead of the running ones.

    Returns:
      {'layer0': [B, H/4, W/4, c0], 'layer1': [B, H/4, W/4, c1], 'layer2': [B, H/8, W/8, c2],
      'layer3', 'layer4'}: sides are ceil-halvings of H, W; layer3 is at 1/8 for output
      stride 8 else 1/16, layer4 at 1/output_stride; c0 = 2*width (deep) or width
      (deep_v1c, classic), c1..c4 = stage_channels(depth, width).
    """
    check_resnet_args(self.depth, self.stem, self.output_stride, self.width)
    conv = functools.partial(Conv, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(
      BatchNorm,
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    kind, counts = DEPTHS[self.depth]
    geometry = ((1, 1), (2, 1), *STAGE_GEOMETRY[self.output_stride])
    x = x.astype(self.dtype)
    out = {'layer0': Stem(self.stem, self.width, conv, norm, name='layer0')(x, train=train)}
    x = out['layer0']
    for s, (n, (stride, dilation)) in enumerate(zip(counts, geometry, strict=True)):
      name = f'layer{s + 1}'
      planes = self.width * 2**s
      layer = ResLayer(
        kind, planes, n, stride, dilation, conv, norm, self.contract_dilation, name=name
      )
      x = out[name] = layer(x, train=train)
    return out
