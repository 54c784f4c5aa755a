"""Weights between mmsegmentation's PSPNet checkpoints (its model zoo) and the Flax PSPNet.

  python -m psp_jax.convert pspnet_r50-d8_512x512_160k_ade20k_20200615_184358-1890b0bd.pth DIR
  python -m psp_jax.convert DIR pspnet_mmseg.pth            # back, in mmseg's layout

mmseg's network is the official one with ResNetV1c's stem and MMSEG_VARIANT; its keys map
one to one onto the official names (NAMES). Design: docs/design.md#pytorch-layouts
"""

import collections
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from psp_jax.interop import semseg
from psp_jax.interop.semseg import CheckpointMismatchError

# What the weights cannot tell, as mmseg's PSPNet configs set it (a file is read with these).
MMSEG_VARIANT = dict(contract_dilation=True, align_corners=False)
# Top-level modules of mmseg's EncoderDecoder (an auxiliary head is optional there).
PREFIXES = ('backbone.', 'decode_head.', 'auxiliary_head.')
# (official prefix, mmseg prefix); {n} is a block or branch number kept as it is. The first
# match wins, so the classic stem's layer0.0 / layer0.1 come before the deep stems' rule.
CLASSIC_STEM = (('layer0.0.', 'backbone.conv1.'), ('layer0.1.', 'backbone.bn1.'))
NAMES = (
  ('layer0.{n}.', 'backbone.stem.{n}.'),
  ('layer{n}.', 'backbone.layer{n}.'),
  ('ppm.features.{n}.1.', 'decode_head.psp_modules.{n}.1.conv.'),
  ('ppm.features.{n}.2.', 'decode_head.psp_modules.{n}.1.bn.'),
  ('cls.0.', 'decode_head.bottleneck.conv.'),
  ('cls.1.', 'decode_head.bottleneck.bn.'),
  ('cls.4.', 'decode_head.conv_seg.'),
  ('aux.0.', 'auxiliary_head.convs.0.conv.'),
  ('aux.1.', 'auxiliary_head.convs.0.bn.'),
  ('aux.4.', 'auxiliary_head.conv_seg.'),
)


def _pattern(template: str) -> re.Pattern:
  return re.compile(re.escape(template).replace(re.escape('{n}'), r'(\d+)'))


def _rename(key: str, rules: tuple[tuple[str, str], ...], forward: bool) -> str | None:
  """key renamed by the first rule whose prefix (official if forward, else mmseg) it has."""
  for official, mmseg in rules:
    source, target = (official, mmseg) if forward else (mmseg, official)
    match = _pattern(source).match(key)
    if match:
      head = target.replace('{n}', match.group(1)) if match.groups() else target
      return head + key[match.end() :]
  return None


def mmseg_name(official_key: str, stem: str) -> str:
  """mmseg's name of an official key (layer0.1.weight -> backbone.stem.1.weight)."""
  rules = (CLASSIC_STEM if stem == 'classic' else ()) + NAMES
  name = _rename(official_key, rules, forward=True)
  if name is None:
    raise KeyError(official_key)
  return name


def official_name(mmseg_key: str) -> str | None:
  """The official name of an mmseg key, None for a key outside the table."""
  return _rename(mmseg_key, CLASSIC_STEM + NAMES, forward=False)


def is_mmseg_state_dict(state_dict: Mapping[str, Any]) -> bool:
  """Whether a bare state_dict has mmseg's EncoderDecoder names (heads or a backbone.*)."""
  return any(k.startswith(PREFIXES) for k in state_dict)


def dataset_meta(checkpoint: Any) -> dict[str, list] | None:
  """{'classes': [names], 'palette': [[r, g, b], ...]} of a zoo file's meta, or None.

  mmseg 0.x saves meta['CLASSES'] and meta['PALETTE']; 1.x meta['dataset_meta'] with
  'classes' and 'palette'. A palette whose length or rows do not fit is left out.
  """
  meta = checkpoint.get('meta') if isinstance(checkpoint, Mapping) else None
  if not isinstance(meta, Mapping):
    return None
  inner = meta.get('dataset_meta')
  if isinstance(inner, Mapping):
    names, palette = inner.get('classes'), inner.get('palette')
  else:
    names, palette = meta.get('CLASSES'), meta.get('PALETTE')
  if not isinstance(names, list | tuple) or not names:
    return None
  out = {'classes': [str(n) for n in names]}
  try:
    colours = np.asarray(palette, np.int64)
  except (TypeError, ValueError):
    return out
  if colours.shape == (len(names), 3) and colours.min() >= 0 and colours.max() <= 255:
    out['palette'] = colours.tolist()
  return out


def expected_mmseg_shapes(model_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """mmseg state_dict keys (in its order) and shapes of a configuration, from
  torch_mmseg.TorchMMSegPSPNet on the meta device (nothing allocated)."""
  import torch  # noqa: PLC0415 (only conversion needs torch)

  from psp_jax.interop import torch_mmseg  # noqa: PLC0415 (it imports torch at the top)

  try:
    with torch.device('meta'):
      model = torch_mmseg.build(dict(model_config))
  except ValueError as e:
    raise CheckpointMismatchError(f'no mmseg layout for this PSPNet: {e}') from None
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_mmseg_config(
  state_dict: Mapping[str, Any], bins: tuple[int, ...] | None = None
) -> dict[str, Any]:
  """PSPNet kwargs of an mmseg-named state_dict: the structure read off its keys and
  shapes (semseg.infer_model_config on the official names) and MMSEG_VARIANT.

  Raises:
    CheckpointMismatchError: not recognisably a PSPNet.
  """
  renamed = {official_name(k): v for k, v in state_dict.items()}
  renamed.pop(None, None)
  try:
    config = semseg.infer_model_config(renamed, bins)
  except CheckpointMismatchError as e:
    raise CheckpointMismatchError(
      f'{e} (mmseg names read as the official ones: backbone.stem = layer0, '
      'decode_head.psp_modules = ppm, decode_head.bottleneck/conv_seg = cls, '
      'auxiliary_head = aux)'
    ) from None
  return {**config, **MMSEG_VARIANT}


def from_mmseg_state_dict(
  checkpoint: Mapping[str, Any], model_config: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Flax variables of an mmseg PSPNet checkpoint (ResNet-50/101/152, any wrapping).

  Args:
    checkpoint: torch.load() of a zoo file ({'meta', 'state_dict'}), a bare state_dict, keys
      with or without 'module.'.
    model_config: PSPNet kwargs the weights must fit (e.g. {'depth': 101}); by default read
      off the checkpoint. MMSEG_VARIANT always applies: it is what the file means.
  Returns:
    ({'params', 'batch_stats'} of numpy arrays, model_config actually used).
  Raises:
    CheckpointMismatchError: listing every missing / unexpected / mis-shaped key.
  """
  sd = semseg.unwrap_state_dict(checkpoint)
  bins = (model_config or {}).get('bins')
  try:
    inferred = infer_mmseg_config(sd, None if bins is None else tuple(bins))
  except CheckpointMismatchError:
    if model_config is None:
      raise
    inferred = None
  base = inferred or {**semseg.DEFAULT_CONFIG, 'stem': 'deep_v1c'}
  config = {**base, **(model_config or {}), **MMSEG_VARIANT}
  expected = expected_mmseg_shapes(config)
  found = {k: tuple(v.shape) for k, v in sd.items()}
  hint = semseg.mismatch_hint(inferred, config, 'an mmseg checkpoint')
  semseg.check_keys(found, expected, 'the mmseg PSPNet checkpoint', hint)
  renamed = {official_name(k): sd[k] for k in expected if k in sd}
  return semseg.torch_to_flax(renamed, [official_name(k) for k in expected]), config


def to_mmseg_state_dict(
  variables: Mapping[str, Any], model_config: Mapping[str, Any] | None = None
) -> 'collections.OrderedDict[str, Any]':
  """mmseg-format state_dict (torch tensors, mmseg's order, num_batches_tracked = 0).

  Loads with strict=True into mmseg's PSPNet (= psp_jax.interop.torch_mmseg.TorchMMSegPSPNet).

  Args:
    variables: {'params', 'batch_stats'} of the Flax PSPNet.
    model_config: PSPNet kwargs: bins (not in the weights), MMSEG_VARIANT (check_variant).
  Raises:
    CheckpointMismatchError: variables off the layout, or a model with other values of
      MMSEG_VARIANT's options (an mmseg file would be read back as another network).
  """
  import torch  # noqa: PLC0415

  semseg.check_variant(model_config or {}, MMSEG_VARIANT, 'mmseg')
  named = semseg.to_torch_names(variables)
  bins = (model_config or {}).get('bins')
  config = {**semseg.infer_model_config(named, None if bins is None else tuple(bins))}
  config.update(MMSEG_VARIANT)
  expected = expected_mmseg_shapes(config)
  renamed = {mmseg_name(k, config['stem']): v for k, v in named.items()}
  semseg.check_keys({k: v.shape for k, v in renamed.items()}, expected, 'the Flax variables', '')
  out = collections.OrderedDict()
  for key in expected:
    if key.endswith('num_batches_tracked'):
      out[key] = torch.tensor(0, dtype=torch.long)
    else:
      out[key] = torch.from_numpy(np.array(renamed[key]))
  return out


def to_mmseg_checkpoint(
  variables: Mapping[str, Any],
  model_config: Mapping[str, Any] | None = None,
  meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """A zoo-style file: {'meta': ..., 'state_dict': to_mmseg_state_dict(...)}.

  Args:
    meta: dataset_meta's {'classes', 'palette'}, written as both 1.x dataset_meta and 0.x
      CLASSES / PALETTE so either mmseg reads them; None writes an empty meta.
  """
  out_meta: dict[str, Any] = {}
  if meta and meta.get('classes'):
    names = [str(n) for n in meta['classes']]
    out_meta['dataset_meta'] = {'classes': names}
    out_meta['CLASSES'] = names
    if meta.get('palette') is not None:
      palette = [[int(v) for v in row] for row in meta['palette']]
      out_meta['dataset_meta']['palette'] = palette
      out_meta['PALETTE'] = palette
  return {'meta': out_meta, 'state_dict': to_mmseg_state_dict(variables, model_config)}


def backbone_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any] | None:
  """The ResNet of an mmseg / mmpretrain file holding only a backbone ('backbone.*', with
  an optional ImageNet 'head.*'), named as open-mmlab's resnet50_v1c (stem.*, layer*); None
  for anything else."""
  keys = list(state_dict)
  if not any(k.startswith('backbone.') for k in keys):
    return None
  if not all(k.startswith(('backbone.', 'head.')) for k in keys):
    return None
  return {k[len('backbone.') :]: v for k, v in state_dict.items() if k.startswith('backbone.')}
