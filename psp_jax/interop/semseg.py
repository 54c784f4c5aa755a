"""Weights between official PyTorch PSPNet checkpoints (hszhao/semseg) and the Flax PSPNet.

  python -m psp_jax.convert train_epoch_100.pth OUT_DIR   # .pth -> weights dir
  python -m psp_jax.convert OUT_DIR pspnet.pth            # weights dir -> official .pth

The Flax tree is the official one renamed (the naming tables below), kernels transposed
OIHW -> HWIO; a checkpoint is checked against the exact official layout.
Design: docs/design.md#pytorch-layouts
"""

import collections
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from psp_jax import errors
from psp_jax.models.resnet import DEPTHS

# Flax module name -> index in the official nn.Sequential (pspnet.py: layer0 is
# conv1, bn1, relu, conv2, bn2, relu, conv3, bn3, relu, maxpool; cls/aux are conv, bn, relu,
# dropout, conv; PPM branches are pool, conv, bn, relu; downsample is conv, bn).
LAYER0 = {'conv1': '0', 'bn1': '1', 'conv2': '3', 'bn2': '4', 'conv3': '6', 'bn3': '7'}
HEAD = {'conv1': '0', 'bn1': '1', 'conv2': '4'}
PPM = {'conv': '1', 'bn': '2'}
DOWNSAMPLE = {'conv': '0', 'bn': '1'}
BLOCK = ('conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3')
# (collection, Flax leaf) <-> torch parameter/buffer name.
CONV_LEAVES = {('params', 'kernel'): 'weight', ('params', 'bias'): 'bias'}
BN_LEAVES = {
  ('params', 'scale'): 'weight',
  ('params', 'bias'): 'bias',
  ('batch_stats', 'mean'): 'running_mean',
  ('batch_stats', 'var'): 'running_var',
}
# Blocks per stage -> depth (resnet18 ... resnet152 in model/resnet.py), from models.resnet.
DEPTH_OF_COUNTS = {(kind, counts): depth for depth, (kind, counts) in DEPTHS.items()}
# What the weights determine (the hint compares these); the rest cannot be read off them.
STRUCTURAL = ('num_classes', 'depth', 'stem', 'width', 'use_ppm', 'reduce_dim', 'head_channels')
STRUCTURAL += ('aux_channels',)
DEFAULT_CONFIG = dict(output_stride=8, pool='avg', dropout_rate=0.1, dtype='float32')
BACKBONE_STEM = {'conv1': 'layer0.0', 'bn1': 'layer0.1', 'conv2': 'layer0.3', 'bn2': 'layer0.4'}
BACKBONE_STEM.update({'conv3': 'layer0.6', 'bn3': 'layer0.7', 'stem': 'layer0'})  # stem: v1c


class CheckpointMismatchError(errors.UserError, ValueError):
  """A checkpoint whose keys or shapes do not fit the model; the message lists them all."""


def _module_to_torch(path: tuple[str, ...]) -> str:
  """Flax module path (without collection and leaf) -> official torch module prefix."""
  match path:
    case ('backbone', 'layer0', m) if m in LAYER0:
      return f'layer0.{LAYER0[m]}'
    case ('backbone', stage, i, m) if re.fullmatch(r'layer[1-4]', stage) and m in BLOCK:
      return f'{stage}.{int(i)}.{m}'
    case ('backbone', stage, i, 'downsample', m) if m in DOWNSAMPLE:
      return f'{stage}.{int(i)}.downsample.{DOWNSAMPLE[m]}'
    case ('ppm', k, m) if m in PPM:
      return f'ppm.features.{int(k)}.{PPM[m]}'
    case (('cls' | 'aux') as head, m) if m in HEAD:
      return f'{head}.{HEAD[m]}'
  raise KeyError('/'.join(path))


def _torch_to_module(prefix: str) -> tuple[str, ...]:
  """Official torch module prefix -> Flax module path; KeyError for a foreign name."""
  inverse = lambda table, v: next(k for k, x in table.items() if x == v)
  parts = prefix.split('.')
  try:
    match parts:
      case ['layer0', idx]:
        return ('backbone', 'layer0', inverse(LAYER0, idx))
      case [stage, i, m] if re.fullmatch(r'layer[1-4]', stage) and m in BLOCK and i.isdigit():
        return ('backbone', stage, i, m)
      case [stage, i, 'downsample', idx] if re.fullmatch(r'layer[1-4]', stage) and i.isdigit():
        return ('backbone', stage, i, 'downsample', inverse(DOWNSAMPLE, idx))
      case ['ppm', 'features', k, idx] if k.isdigit():
        return ('ppm', k, inverse(PPM, idx))
      case [('cls' | 'aux') as head, idx]:
        return (head, inverse(HEAD, idx))
  except StopIteration:
    pass
  raise KeyError(prefix)


def _to_numpy(value: Any) -> np.ndarray:
  # A copy: torch's .numpy() shares memory, and a later in-place update of the module
  # (BatchNorm running stats in train mode) would otherwise change the converted arrays.
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch here
    return value.detach().cpu().numpy().copy()
  return np.array(value)


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The bare state_dict of a checkpoint as numpy: {'state_dict': ...} and 'module.' removed.

  Args:
    checkpoint: what torch.load returned (tool/train.py saves {'epoch', 'state_dict',
      'optimizer'} with DataParallel's 'module.' prefix on every key).
  """
  sd = checkpoint
  if 'state_dict' in sd and isinstance(sd['state_dict'], Mapping):
    sd = sd['state_dict']
  if not sd or not all(isinstance(k, str) for k in sd):
    raise CheckpointMismatchError('not a state_dict: expected a dict of named tensors.')
  if all(k.startswith('module.') for k in sd):
    sd = {k[len('module.') :]: v for k, v in sd.items()}
  return {k: _to_numpy(v) for k, v in sd.items()}


def _count(sd: Mapping[str, Any], pattern: str) -> int:
  """1 + the largest integer captured by pattern among the keys (0 if none matches)."""
  found = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
  return max(found) + 1 if found else 0


def infer_backbone_config(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """{depth, stem, width} of official-format backbone keys (layer0..layer4).

  width is layer1's; stem 'classic' (7x7), 'deep' (last conv 2 x width) or 'deep_v1c' (width).

  Raises:
    CheckpointMismatchError: the blocks per stage or the stem are not a known ResNet.
  """
  counts = tuple(_count(state_dict, rf'layer{s}\.(\d+)\.') for s in range(1, 5))
  kind = 'bottleneck' if 'layer1.0.conv3.weight' in state_dict else 'basic'
  depth = DEPTH_OF_COUNTS.get((kind, counts))
  stem = state_dict.get('layer0.0.weight')
  if depth is None or stem is None:
    raise CheckpointMismatchError(
      f'cannot recognise a ResNet: blocks per stage {counts} ({kind}; ResNet-18/34/50/101/152'
      ' have (2,2,2,2), (3,4,6,3), (3,4,6,3), (3,4,23,3), (3,8,36,3)), stem conv '
      f'layer0.0.weight {None if stem is None else tuple(stem.shape)}. First keys: '
      f'{sorted(state_dict)[:6]}'
    )
  width = int(state_dict.get('layer1.0.conv1.weight', stem).shape[0])
  last = state_dict.get('layer0.6.weight', np.empty(0))  # deep stems' last conv: 2w or w
  kind = 'classic' if stem.shape[-1] == 7 else 'deep_v1c' if last.shape[0] == width else 'deep'
  return dict(depth=depth, stem=kind, width=width)


def infer_model_config(state_dict: Mapping[str, Any], bins: tuple[int, ...] | None = None) -> dict:
  """PSPNet keyword arguments read off an official-format state_dict's keys and shapes.

  Weights cannot tell output_stride, pool or dropout_rate: those get the official values.
  Bin sizes neither: 4 branches are taken as (1, 2, 3, 6) and 1 as (1,); pass `bins` else.

  Args:
    state_dict: official names (unwrap_state_dict first), values with a .shape.
    bins: pyramid bin sizes, needed only for an unusual number of PPM branches.
  Returns:
    JSON-serialisable dict (bins as a list).
  Raises:
    CheckpointMismatchError: not recognisably a PSPNet.
  """
  shape = lambda k: tuple(state_dict[k].shape) if k in state_dict else None
  backbone = infer_backbone_config(state_dict)
  classifier = shape('cls.4.weight') or shape('aux.4.weight')
  if classifier is None:
    raise CheckpointMismatchError(
      'cannot recognise a PSPNet: no classifier (cls.4.weight / aux.4.weight). An ImageNet '
      'backbone file goes through load_backbone / config.init_checkpoint instead.'
    )
  n_bins = _count(state_dict, r'ppm\.features\.(\d+)\.')
  if bins is None and n_bins:
    bins = {1: (1,), 4: (1, 2, 3, 6)}.get(n_bins)
    if bins is None:
      raise CheckpointMismatchError(
        f'the checkpoint has {n_bins} pyramid branches; their bin sizes are not in the weights:'
        ' pass them (bins=..., or --bins on the command line).'
      )
  ppm_w = shape('ppm.features.0.1.weight')
  config = dict(
    num_classes=classifier[0],
    **backbone,
    bins=list(bins or (1, 2, 3, 6)),
    use_ppm=n_bins > 0,
    reduce_dim=not ppm_w or ppm_w[0] != ppm_w[1] or n_bins == 1,
    head_channels=(shape('cls.0.weight') or (512,))[0],
    aux_channels=(shape('aux.0.weight') or (256,))[0],
  )
  return {**config, **DEFAULT_CONFIG}


def expected_torch_shapes(model_config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """Official state_dict keys (in order) and shapes of a configuration, num_batches_tracked
  included: TorchPSPNet built on the meta device, so nothing is allocated."""
  import torch  # noqa: PLC0415 (only conversion needs torch)

  from psp_jax.interop import torch_pspnet  # noqa: PLC0415 (it imports torch at the top)

  with torch.device('meta'):
    model = torch_pspnet.build(dict(model_config))
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _describe(config: Mapping[str, Any]) -> str:
  name = f'PSPNet-{config["depth"]}'
  extra = [f'{k}={config[k]}' for k in STRUCTURAL if k != 'depth']
  return f'{name} ({", ".join(extra)})'


def check_keys(
  found: Mapping[str, tuple[int, ...]],
  expected: Mapping[str, tuple[int, ...]],
  what: str,
  hint: str,
) -> None:
  """Raises one CheckpointMismatchError listing every missing, unexpected, mis-shaped key
  of `found` against `expected` (keys -> shapes); `what` names the file, `hint` may say more."""
  optional = {k for k in expected if k.endswith('num_batches_tracked')}  # absent before 0.4.1
  missing = [k for k in expected if k not in found and k not in optional]
  unexpected = [k for k in found if k not in expected]
  shapes = [
    f'{k}: checkpoint {found[k]}, model {expected[k]}'
    for k in expected
    if k in found and tuple(found[k]) != tuple(expected[k])
  ]
  if not (missing or unexpected or shapes):
    return
  lines = [f'{what} does not fit the model.']
  if hint:
    lines.append(f'Hint: {hint}')
  for title, items in (
    ('missing keys', missing),
    ('unexpected keys', unexpected),
    ('wrong shapes', shapes),
  ):
    if items:
      lines.append(f'{len(items)} {title}:')
      lines.extend(f'  {item}' for item in items)
  raise CheckpointMismatchError('\n'.join(lines))


def mismatch_hint(inferred: Mapping[str, Any] | None, config: Mapping[str, Any], kind: str) -> str:
  """'looks like {kind} of PSPNet-50 (...) but the config says ...', or '' where they agree."""
  if inferred is None:
    return ''
  diff = [f'{k}={config[k]}' for k in STRUCTURAL if k in config and inferred[k] != config[k]]
  if not diff:
    return ''
  return f'looks like {kind} of {_describe(inferred)} but the config says {", ".join(diff)}.'


def torch_to_flax(state_dict: Mapping[str, np.ndarray], expected: Iterable[str]) -> dict[str, Any]:
  """{'params', 'batch_stats'} of an official-named state_dict already checked against the
  keys `expected`: renamed, kernels transposed (numpy)."""
  variables: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  for key in expected:
    if key.endswith('num_batches_tracked'):
      continue  # torch's counter; Flax BatchNorm (momentum, not cumulative) has no use for it
    prefix, name = key.rsplit('.', 1)
    module = _torch_to_module(prefix)
    table = BN_LEAVES if module[-1].startswith('bn') else CONV_LEAVES
    collection, leaf = next(k for k, v in table.items() if v == name)
    value = state_dict[key]
    if leaf == 'kernel':
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    node = variables[collection]
    for part in module:
      node = node.setdefault(part, {})
    node[leaf] = np.ascontiguousarray(value)
  return variables


def from_torch_state_dict(
  checkpoint: Mapping[str, Any], model_config: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Flax variables of an official PSPNet checkpoint (50/101/152, any wrapping).

  Args:
    checkpoint: torch.load() of a semseg checkpoint: a state_dict or {'state_dict': ...},
      keys with or without 'module.'.
    model_config: PSPNet kwargs the weights must fit (e.g. from a training config); by
      default read off the checkpoint.
  Returns:
    ({'params', 'batch_stats'} of numpy arrays, model_config actually used).
  Raises:
    CheckpointMismatchError: listing every missing / unexpected / mis-shaped key.
  """
  sd = unwrap_state_dict(checkpoint)
  try:
    bins = (model_config or {}).get('bins')
    inferred = infer_model_config(sd, None if bins is None else tuple(bins))
  except CheckpointMismatchError:
    if model_config is None:
      raise
    inferred = None
  config = {**(inferred or DEFAULT_CONFIG), **(model_config or {})}
  expected = expected_torch_shapes(config)
  found = {k: tuple(v.shape) for k, v in sd.items()}
  hint = mismatch_hint(inferred, config, 'a checkpoint')
  check_keys(found, expected, 'the PSPNet checkpoint', hint)
  return torch_to_flax(sd, expected), config


def to_torch_names(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax leaves under their official names, kernels transposed to OIHW (numpy, no torch).

  Args:
    variables: {'params', 'batch_stats'} or a part of it (e.g. {'params': grads}).
  Returns:
    {official key: array}, without num_batches_tracked.
  """
  out, unknown = {}, []
  for collection in ('params', 'batch_stats'):
    flat = traverse_util.flatten_dict(dict(variables.get(collection, {})))
    for path, value in flat.items():
      module, leaf = tuple(map(str, path[:-1])), str(path[-1])
      table = BN_LEAVES if module and module[-1].startswith('bn') else CONV_LEAVES
      try:
        name = f'{_module_to_torch(module)}.{table[(collection, leaf)]}'
      except KeyError:
        unknown.append('/'.join((collection, *module, leaf)))
        continue
      value = np.asarray(value)
      out[name] = value.transpose(3, 2, 0, 1) if leaf == 'kernel' else value  # HWIO -> OIHW
  if unknown:
    raise CheckpointMismatchError(
      'variables hold leaves with no official PyTorch name (the model tree does not follow '
      'the naming contract of psp_jax.convert):\n' + '\n'.join(f'  {u}' for u in unknown)
    )
  return out


def to_torch_state_dict(
  variables: Mapping[str, Any], model_config: Mapping[str, Any] | None = None
) -> 'collections.OrderedDict[str, Any]':
  """Official-format state_dict (torch tensors, official order, num_batches_tracked = 0).

  Loads with strict=True into the original PSPNet (= psp_jax.interop.torch_pspnet.TorchPSPNet).

  Args:
    variables: {'params', 'batch_stats'} of the Flax PSPNet.
    model_config: PSPNet kwargs: bins (not in the weights), OFFICIAL_VARIANT (check_variant).
  """
  import torch  # noqa: PLC0415

  check_variant(model_config or {}, OFFICIAL_VARIANT, 'semseg')

  named = to_torch_names(variables)
  bins = (model_config or {}).get('bins')
  config = infer_model_config(named, None if bins is None else tuple(bins))
  expected = expected_torch_shapes(config)
  found = {k: tuple(v.shape) for k, v in named.items()}
  check_keys(found, expected, 'the Flax variables', '')
  out = collections.OrderedDict()
  for key in expected:
    if key.endswith('num_batches_tracked'):
      out[key] = torch.tensor(0, dtype=torch.long)
    else:
      out[key] = torch.from_numpy(np.array(named[key]))
  return out


# Options the weights cannot tell: a semseg-layout file is read as the official network.
OFFICIAL_VARIANT = dict(contract_dilation=False, align_corners=True)


def check_variant(model_config: Mapping[str, Any], variant: Mapping[str, Any], layout: str) -> None:
  """Raises CheckpointMismatchError unless model_config has `variant`, the values the files
  of `layout` are read with: weights exported otherwise would change meaning on reading."""
  diff = [f'{k}={model_config[k]}' for k, v in variant.items() if model_config.get(k, v) != v]
  if diff:
    assumed = ', '.join(f'{k}={v}' for k, v in variant.items())
    raise CheckpointMismatchError(
      f'the model has {", ".join(diff)}, which {layout} checkpoints cannot hold (they are '
      f'read as {assumed}): export it in the other layout (convert --layout).'
    )


def backbone_from_torch_state_dict(
  checkpoint: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Backbone variables of an ImageNet ResNet file (semseg resnet50_v2, torchvision, mmseg v1c).

  Accepted names: the deep stem as semseg's ResNet saves it (conv1/bn1/conv2/bn2/conv3/bn3
  at top level, e.g. initmodel/resnet50_v2.pth) or as PSPNet's layer0.{0,1,3,4,6,7};
  torchvision's 7x7 conv1/bn1 (classic stem); open-mmlab's resnet50_v1c / resnet101_v1c
  (stem.{0,1,3,4,6,7}, the 'deep_v1c' stem); then layer1..layer4. The ImageNet classifier
  fc.* is ignored on purpose; any other extra key is an error.

  Returns:
    ({'params': {'backbone': ...}, 'batch_stats': {'backbone': ...}}, model kwargs known from
    the file: depth, stem, width).
  """
  sd = unwrap_state_dict(checkpoint)
  sd = {k: v for k, v in sd.items() if not k.startswith('fc.')}  # ImageNet head: not used
  renamed = {}
  for key, value in sd.items():
    head, _, rest = key.partition('.')
    renamed[f'{BACKBONE_STEM[head]}.{rest}' if head in BACKBONE_STEM else key] = value
  try:
    config = infer_backbone_config(renamed)
  except CheckpointMismatchError as e:
    raise CheckpointMismatchError(f'not a ResNet backbone file: {e}') from None
  full = {**config, 'num_classes': 1, **DEFAULT_CONFIG}
  expected = {k: v for k, v in expected_torch_shapes(full).items() if re.match(r'layer[0-4]\.', k)}
  found = {k: tuple(v.shape) for k, v in renamed.items()}
  check_keys(found, expected, 'the backbone file', '')
  variables = torch_to_flax(renamed, expected)
  return variables, config


def load_backbone(variables: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> dict[str, Any]:
  """A copy of `variables` whose backbone comes from an ImageNet ResNet file.

  Args:
    variables: {'params', 'batch_stats'} of a (fresh) PSPNet.
    checkpoint: torch.load() of the file (see backbone_from_torch_state_dict).
  Returns:
    new {'params', 'batch_stats'}; ppm, cls and aux untouched, dtypes kept.
  Raises:
    CheckpointMismatchError: the file's backbone differs from the model's (all keys listed).
  """
  loaded, file_config = backbone_from_torch_state_dict(checkpoint)
  model_named = to_torch_names(
    {c: {'backbone': variables[c]['backbone']} for c in ('params', 'batch_stats')}
  )
  model_config = infer_backbone_config(model_named)
  diff = [f'{k}={v}' for k, v in model_config.items() if file_config[k] != v]
  hint = ''
  if diff:
    hint = (
      f'the file is an ImageNet ResNet-{file_config["depth"]} ({file_config["stem"]} stem, '
      f'width {file_config["width"]}) but the model has {", ".join(diff)}.'
    )
  file_named = to_torch_names(loaded)
  check_keys(
    {k: v.shape for k, v in file_named.items()},
    {k: v.shape for k, v in model_named.items()},
    'the backbone file',
    hint,
  )
  out = {}
  for collection in ('params', 'batch_stats'):
    flat = traverse_util.flatten_dict(dict(variables[collection]))
    new = traverse_util.flatten_dict(loaded[collection])
    for path, value in new.items():
      old = flat[('backbone', *path[1:])]
      flat[('backbone', *path[1:])] = np.asarray(value, dtype=old.dtype)
    out[collection] = traverse_util.unflatten_dict(flat)
  return out
