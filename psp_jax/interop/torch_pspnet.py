"""PSPNet in PyTorch with the official hszhao/semseg state_dict layout (parity reference).

Its `state_dict()` has exactly the keys and shapes of the released checkpoints, so they load
with strict=True; `forward` never computes a loss and takes any input size.
Design: docs/design.md#pytorch-layouts
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from psp_jax.models.resnet import (  # the one table of ResNet depths, stems and dilations
  DEPTHS,
  STEMS,
  first_block_dilation,
  stem_channels,
)

# Blocks per stage and block type: resnet18/34/50/101/152 in model/resnet.py.
# (stride, dilation) of layer3 and layer4 per output stride. 8 is PSPNet's: the original
# patches every layer3/4 conv2 to dilation 2/4, stride 1 (and the downsample to stride 1).
STAGE_GEOMETRY = {
  8: ((1, 2), (1, 4)),
  16: ((2, 1), (1, 2)),
  32: ((2, 1), (2, 1)),
}


def check_args(depth: int, stem: str, output_stride: int, pool: str) -> None:
  """Raises ValueError naming a constructor argument with no meaning here."""
  if depth not in DEPTHS:
    raise ValueError(f'depth={depth}: expected one of {sorted(DEPTHS)}.')
  if stem not in STEMS:
    raise ValueError(f'stem={stem!r}: expected one of {STEMS}.')
  if output_stride not in STAGE_GEOMETRY:
    raise ValueError(f'output_stride={output_stride}: expected one of {sorted(STAGE_GEOMETRY)}.')
  if pool not in ('avg', 'max'):
    raise ValueError(f"pool={pool!r}: expected 'avg' or 'max'.")


def upsample(x: torch.Tensor, size: Sequence[int], align_corners: bool) -> torch.Tensor:
  """F.interpolate bilinear to size (PSPNet: align_corners=True; mmseg: False)."""
  return F.interpolate(x, tuple(size), mode='bilinear', align_corners=align_corners)


def batch_norm(channels: int, eps: float, momentum: float) -> nn.BatchNorm2d:
  """nn.BatchNorm2d in torch's own momentum convention (bn_kw holds eps and momentum)."""
  return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4) residual block, stride on the 3x3 (v1.5)."""

  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, bn_kw: dict):
    super().__init__()
    out = planes * self.expansion
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = batch_norm(planes, **bn_kw)
    self.conv2 = nn.Conv2d(
      planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )
    self.bn2 = batch_norm(planes, **bn_kw)
    self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
    self.bn3 = batch_norm(out, **bn_kw)
    self.downsample = None
    if stride != 1 or inplanes != out:
      self.downsample = nn.Sequential(
        nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), batch_norm(out, **bn_kw)
      )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(y + shortcut)


class BasicBlock(nn.Module):
  """3x3 (stride, dilation) -> 3x3 (dilation) residual block of ResNet-18/34."""

  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, bn_kw: dict):
    super().__init__()
    self.conv1 = nn.Conv2d(
      inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )
    self.bn1 = batch_norm(planes, **bn_kw)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
    self.bn2 = batch_norm(planes, **bn_kw)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(
        nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), batch_norm(planes, **bn_kw)
      )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(y + shortcut)


class PPM(nn.Module):
  """Pyramid pooling: per bin pool -> [1x1 conv -> BN -> ReLU] -> upsample; concat with input."""

  def __init__(
    self,
    in_dim: int,
    bins: Sequence[int],
    pool: str,
    reduce_dim: bool,
    bn_kw: dict,
    align_corners: bool = True,
  ):
    super().__init__()
    self.align_corners = align_corners
    pool_cls = {'avg': nn.AdaptiveAvgPool2d, 'max': nn.AdaptiveMaxPool2d}[pool]
    # PPM(fea_dim, int(fea_dim / len(bins)), bins) in model/pspnet.py.
    out_dim = in_dim // len(bins) if reduce_dim else in_dim
    self.features = nn.ModuleList(
      nn.Sequential(
        pool_cls(b),
        nn.Conv2d(in_dim, out_dim, 1, bias=False),
        batch_norm(out_dim, **bn_kw),
        nn.ReLU(inplace=True),
      )
      for b in bins
    )
    self.out_channels = in_dim + len(bins) * out_dim

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    size = x.shape[2:]
    outs = [x]
    for branch in self.features:
      outs.append(upsample(branch(x), size, self.align_corners))
    return torch.cat(outs, 1)


def stem_convs(stem: str, width: int, bn_kw: dict) -> list[nn.Module]:
  """conv, BN, ReLU per stem conv (deep, deep_v1c: three 3x3; classic: one 7x7), no pool."""
  layers, inplanes = [], 3
  for i, out in enumerate(stem_channels(stem, width)):
    kernel = 7 if stem == 'classic' else 3
    stride = 2 if i == 0 else 1
    conv = nn.Conv2d(inplanes, out, kernel, stride=stride, padding=kernel // 2, bias=False)
    layers += [conv, batch_norm(out, **bn_kw), nn.ReLU(inplace=True)]
    inplanes = out
  return layers


def res_layers(
  depth: int, stem: str, width: int, output_stride: int, contract_dilation: bool, bn_kw: dict
) -> list[nn.Sequential]:
  """layer1..layer4 of a dilated ResNet (block 0 at half dilation when contracting)."""
  kind, counts = DEPTHS[depth]
  block = Bottleneck if kind == 'bottleneck' else BasicBlock
  inplanes = stem_channels(stem, width)[-1]
  geometry = ((1, 1), (2, 1), *STAGE_GEOMETRY[output_stride])
  layers = []
  for s, (n, (stride, dilation)) in enumerate(zip(counts, geometry, strict=True)):
    planes = width * 2**s
    blocks = []
    for i in range(n):
      d = first_block_dilation(dilation, contract_dilation) if i == 0 else dilation
      blocks.append(block(inplanes, planes, stride if i == 0 else 1, d, bn_kw))
      inplanes = planes * block.expansion
    layers.append(nn.Sequential(*blocks))
  return layers


def _head(in_dim: int, mid: int, num_classes: int, dropout: float, bn_kw: dict) -> nn.Sequential:
  """conv3x3 -> BN -> ReLU -> Dropout2d -> conv1x1 (+bias): the original's cls and aux."""
  return nn.Sequential(
    nn.Conv2d(in_dim, mid, 3, padding=1, bias=False),
    batch_norm(mid, **bn_kw),
    nn.ReLU(inplace=True),
    nn.Dropout2d(p=dropout),
    nn.Conv2d(mid, num_classes, 1),
  )


class TorchPSPNet(nn.Module):
  """PSPNet (dilated ResNet + PPM + cls, aux head) with the official state_dict names.

  Keyword arguments are those of psp_jax.models.PSPNet (bn_momentum in Flax's convention:
  the weight of the old running value, so 0.9 here is torch's momentum=0.1).
  """

  def __init__(
    self,
    num_classes: int,
    depth: int = 50,
    stem: str = 'deep',
    output_stride: int = 8,
    contract_dilation: bool = False,
    width: int = 64,
    bins: Sequence[int] = (1, 2, 3, 6),
    pool: str = 'avg',
    use_ppm: bool = True,
    reduce_dim: bool = True,
    head_channels: int = 512,
    aux_channels: int = 256,
    dropout_rate: float = 0.1,
    align_corners: bool = True,
    bn_momentum: float = 0.9,
    bn_epsilon: float = 1e-5,
  ):
    super().__init__()
    check_args(depth, stem, output_stride, pool)
    self.align_corners = align_corners
    bn_kw = dict(eps=bn_epsilon, momentum=1.0 - bn_momentum)
    # resnet.conv1/bn1/relu/conv2/bn2/relu/conv3/bn3/relu/maxpool as layer0 (pspnet.py).
    self.layer0 = nn.Sequential(
      *stem_convs(stem, width, bn_kw), nn.MaxPool2d(3, stride=2, padding=1)
    )
    layers = res_layers(depth, stem, width, output_stride, contract_dilation, bn_kw)
    for s, layer in enumerate(layers):
      setattr(self, f'layer{s + 1}', layer)
    stage_channels = [width * 2**s * layers[0][0].expansion for s in range(4)]

    fea_dim = stage_channels[3]
    self.ppm = None
    if use_ppm:
      self.ppm = PPM(fea_dim, bins, pool, reduce_dim, bn_kw, align_corners)
      fea_dim = self.ppm.out_channels
    self.cls = _head(fea_dim, head_channels, num_classes, dropout_rate, bn_kw)
    self.aux = _head(stage_channels[2], aux_channels, num_classes, dropout_rate, bn_kw)

  def forward(
    self, x: torch.Tensor, return_intermediates: bool = False
  ) -> torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
    """Logits of a [B, 3, H, W] batch, upsampled to H x W (align_corners as constructed).

    Returns:
      eval: [B, classes, H, W]; train: (main, aux) logits, both [B, classes, H, W]. With
      return_intermediates, a dict of layer0..layer4, ppm, cls (and aux in train) before
      upsampling, plus 'logits' (and 'aux_logits') after.
    """
    size = x.shape[2:]
    acts = {}
    x = acts['layer0'] = self.layer0(x)
    x = acts['layer1'] = self.layer1(x)
    x = acts['layer2'] = self.layer2(x)
    x = acts['layer3'] = self.layer3(x)
    x = acts['layer4'] = self.layer4(x)
    if self.ppm is not None:
      x = acts['ppm'] = self.ppm(x)
    acts['cls'] = self.cls(x)
    # F.interpolate(x, size=(h, w), mode='bilinear', align_corners=True) in PSPNet.forward.
    acts['logits'] = upsample(acts['cls'], size, self.align_corners)
    if self.training:
      acts['aux'] = self.aux(acts['layer3'])
      acts['aux_logits'] = upsample(acts['aux'], size, self.align_corners)
    if return_intermediates:
      return acts
    if self.training:
      return acts['logits'], acts['aux_logits']
    return acts['logits']


def build(model_config: dict) -> TorchPSPNet:
  """TorchPSPNet from a PSPNet model-config dict (Flax-only keys such as dtype are dropped)."""
  kwargs = {k: v for k, v in model_config.items() if k not in ('dtype', 'param_dtype')}
  if 'bins' in kwargs:
    kwargs['bins'] = tuple(kwargs['bins'])
  return TorchPSPNet(**kwargs)
