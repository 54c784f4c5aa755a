"""PSPNet in PyTorch with mmsegmentation's state_dict layout (parity reference, no mmseg).

Its `state_dict()` has exactly the keys, shapes and order of the zoo checkpoints, so they
load with strict=True. Design: docs/design.md#pytorch-layouts
"""

from collections.abc import Sequence

import torch
from torch import nn

from psp_jax.interop.torch_pspnet import (
  batch_norm,
  check_args,
  res_layers,
  stem_convs,
  upsample,
)
from psp_jax.models.resnet import DEPTHS, STAGES


class ConvModule(nn.Module):
  """mmcv's ConvModule with BN and ReLU: conv (no bias), bn, activate."""

  def __init__(self, in_dim: int, out_dim: int, kernel: int, bn_kw: dict):
    super().__init__()
    self.conv = nn.Conv2d(in_dim, out_dim, kernel, padding=kernel // 2, bias=False)
    self.bn = batch_norm(out_dim, **bn_kw)
    self.activate = nn.ReLU(inplace=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.activate(self.bn(self.conv(x)))


class MMSegResNet(nn.Module):
  """mmseg's ResNet / ResNetV1c: `stem` (deep) or `conv1`/`bn1` (classic), then layer1..4."""

  def __init__(
    self,
    depth: int,
    stem: str,
    width: int,
    output_stride: int,
    contract_dilation: bool,
    bn_kw: dict,
  ):
    super().__init__()
    convs = stem_convs(stem, width, bn_kw)
    if stem == 'classic':
      self.conv1, self.bn1, self.relu = convs
    else:
      self.stem = nn.Sequential(*convs)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    layers = res_layers(depth, stem, width, output_stride, contract_dilation, bn_kw)
    for s, layer in enumerate(layers):
      setattr(self, f'layer{s + 1}', layer)

  def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
    """[layer0 (stem + max-pool), layer1, layer2, layer3, layer4]."""
    x = self.stem(x) if hasattr(self, 'stem') else self.relu(self.bn1(self.conv1(x)))
    outs = [self.maxpool(x)]
    for s in range(1, 5):
      outs.append(getattr(self, f'layer{s}')(outs[-1]))
    return outs


class PSPHead(nn.Module):
  """mmseg's PSPHead: [x, upsampled pool -> ConvModule 1x1 per bin] -> 3x3 bottleneck -> cls."""

  def __init__(
    self,
    in_dim: int,
    branch_dim: int,
    channels: int,
    num_classes: int,
    bins: Sequence[int],
    dropout: float,
    align_corners: bool,
    bn_kw: dict,
  ):
    super().__init__()
    # BaseDecodeHead registers conv_seg (and dropout) before the subclass's modules.
    self.conv_seg = nn.Conv2d(channels, num_classes, 1)
    self.dropout = nn.Dropout2d(dropout)
    self.psp_modules = nn.ModuleList(
      nn.Sequential(nn.AdaptiveAvgPool2d(b), ConvModule(in_dim, branch_dim, 1, bn_kw)) for b in bins
    )
    self.bottleneck = ConvModule(in_dim + len(bins) * branch_dim, channels, 3, bn_kw)
    self.align_corners = align_corners

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pyramid features [x, branches...], class logits at the feature size)."""
    size = x.shape[2:]
    ppm = torch.cat([x] + [upsample(m(x), size, self.align_corners) for m in self.psp_modules], 1)
    return ppm, self.conv_seg(self.dropout(self.bottleneck(ppm)))


class FCNHead(nn.Module):
  """mmseg's FCNHead with one conv (the auxiliary head): ConvModule 3x3 -> dropout -> cls."""

  def __init__(self, in_dim: int, channels: int, num_classes: int, dropout: float, bn_kw: dict):
    super().__init__()
    self.conv_seg = nn.Conv2d(channels, num_classes, 1)
    self.dropout = nn.Dropout2d(dropout)
    self.convs = nn.ModuleList([ConvModule(in_dim, channels, 3, bn_kw)])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv_seg(self.dropout(self.convs[0](x)))


class TorchMMSegPSPNet(nn.Module):
  """mmseg's PSPNet (EncoderDecoder: backbone, decode_head, auxiliary_head) with its names.

  Keyword arguments are those of psp_jax.models.PSPNet, with mmseg's values as defaults
  (stem 'deep_v1c', contract_dilation, align_corners=False); bn_momentum is Flax's
  convention (0.9 == torch's 0.1). forward is TorchPSPNet's: the same stage names.
  """

  def __init__(
    self,
    num_classes: int,
    depth: int = 50,
    stem: str = 'deep_v1c',
    output_stride: int = 8,
    contract_dilation: bool = True,
    width: int = 64,
    bins: Sequence[int] = (1, 2, 3, 6),
    pool: str = 'avg',
    use_ppm: bool = True,
    reduce_dim: bool = True,
    head_channels: int = 512,
    aux_channels: int = 256,
    dropout_rate: float = 0.1,
    align_corners: bool = False,
    bn_momentum: float = 0.9,
    bn_epsilon: float = 1e-5,
  ):
    super().__init__()
    check_args(depth, stem, output_stride, pool)
    check_mmseg_args(depth, pool, use_ppm)
    bn_kw = dict(eps=bn_epsilon, momentum=1.0 - bn_momentum)
    self.align_corners = align_corners
    self.backbone = MMSegResNet(depth, stem, width, output_stride, contract_dilation, bn_kw)
    layer4 = width * 8 * 4  # bottleneck blocks only (check_mmseg_args)
    branch = layer4 // len(bins) if reduce_dim else layer4
    self.decode_head = PSPHead(
      layer4, branch, head_channels, num_classes, bins, dropout_rate, align_corners, bn_kw
    )
    self.auxiliary_head = FCNHead(layer4 // 2, aux_channels, num_classes, dropout_rate, bn_kw)

  def forward(
    self, x: torch.Tensor, return_intermediates: bool = False
  ) -> torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]:
    """Logits of a [B, 3, H, W] batch resized to H x W (mmseg: align_corners=False).

    Returns:
      as TorchPSPNet.forward: eval logits, train (main, aux), or with return_intermediates
      layer0..layer4, ppm, cls (aux in train), 'logits' (and 'aux_logits').
    """
    size = x.shape[2:]
    acts = dict(zip(STAGES, self.backbone(x), strict=True))
    acts['ppm'], acts['cls'] = self.decode_head(acts['layer4'])
    acts['logits'] = upsample(acts['cls'], size, self.align_corners)
    if self.training:
      acts['aux'] = self.auxiliary_head(acts['layer3'])
      acts['aux_logits'] = upsample(acts['aux'], size, self.align_corners)
    if return_intermediates:
      return acts
    if self.training:
      return acts['logits'], acts['aux_logits']
    return acts['logits']


def check_mmseg_args(depth: int, pool: str, use_ppm: bool) -> None:
  """Raises ValueError for a PSPNet that mmseg's PSPHead / ResNet cannot express exactly.

  mmseg's BasicBlock (ResNet-18/34) dilates only its first 3x3 conv where this model's
  dilates both; its PSPHead always average-pools and always has the pyramid.
  """
  if DEPTHS.get(depth, ('bottleneck',))[0] != 'bottleneck':
    raise ValueError(
      f"depth={depth}: mmseg's ResNet-{depth} BasicBlock dilates only its first conv, unlike "
      "this model's; only the bottleneck depths (50, 101, 152) have mmseg's layout here."
    )
  if pool != 'avg' or not use_ppm:
    raise ValueError(
      f"pool={pool!r}, use_ppm={use_ppm}: mmseg's PSPHead has the pyramid, average-pooled."
    )


def build(model_config: dict) -> TorchMMSegPSPNet:
  """TorchMMSegPSPNet from a model config; keys it lacks take mmseg's values, not PSPNet's."""
  kwargs = {k: v for k, v in model_config.items() if k not in ('dtype', 'param_dtype')}
  if 'bins' in kwargs:
    kwargs['bins'] = tuple(kwargs['bins'])
  return TorchMMSegPSPNet(**kwargs)
