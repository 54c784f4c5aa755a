"""PyTorch files: PSPNet checkpoints (semseg or mmseg layout) and ImageNet backbones.

A file's layout is recognised from its keys (detect_layout). Files are read with
torch.load(weights_only=True) only, and torch is imported only when a file is read or
written. Design: docs/design.md#pytorch-layouts
"""

import os
import pickle
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from psp_jax import errors
from psp_jax.interop import mmseg, semseg
from psp_jax.paths import as_path

LAYOUTS = ('semseg', 'mmseg')  # Of PSPNet checkpoints, both read and written.
KNOWN_LAYOUTS = (
  'semseg PSPNet (hszhao/semseg: layer0-4.*, ppm.features.*, cls.*, aux.*)',
  'mmseg PSPNet (mmsegmentation: backbone.*, decode_head.*, auxiliary_head.*)',
  "ImageNet ResNet backbone (semseg's resnet50_v2: conv1-3/bn1-3.*; torchvision: conv1, bn1; "
  "open-mmlab's resnet50_v1c: stem.*; then layer1-4.*)",
)


class TorchCheckpoint(NamedTuple):
  """What a PyTorch file holds, converted."""

  variables: dict[str, Any]  # {'params', 'batch_stats'}; only 'backbone' for a backbone
  model_config: dict[str, Any]  # PSPNet kwargs; {depth, stem, width} for a backbone
  layout: str  # 'semseg', 'mmseg' or 'backbone'
  dataset_meta: dict[str, list] | None  # {'classes', 'palette'} of an mmseg file's meta


def detect_layout(state_dict: Mapping[str, Any]) -> str:
  """'semseg', 'mmseg' or 'backbone' (ImageNet ResNet) of a bare state_dict's keys.

  Raises:
    CheckpointMismatchError: naming the layouts known and the file's first keys.
  """
  keys = list(state_dict)
  if any(k.startswith(('decode_head.', 'auxiliary_head.')) for k in keys):
    return 'mmseg'
  if mmseg.backbone_state_dict(state_dict) is not None:
    return 'backbone'
  if any(k.startswith(('cls.', 'aux.', 'ppm.')) for k in keys):
    return 'semseg'
  if any(re.match(r'layer[1-4]\.', k) for k in keys):
    return 'backbone'  # backbone_from_torch_state_dict lists whatever else is off
  raise semseg.CheckpointMismatchError(
    'not a checkpoint of a layout this reads. Known layouts: '
    + '; '.join(KNOWN_LAYOUTS)
    + f'. First keys: {sorted(keys)[:6]}'
  )


def _unsafe_file(path: Any, global_name: str) -> errors.UnreadableFileError:
  """The error for a file that torch.load(weights_only=True) refuses: it holds objects.

  No advice here may load the file any other way: unpickling its objects runs their code.
  """
  try:  # Lists the pickled globals without loading anything.
    import torch  # noqa: PLC0415 (read_torch_file imported it)

    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) or [global_name]
  except Exception:  # An older torch, or a file it cannot list: the name torch.load gave.
    names = [global_name]
  shown = ', '.join(names[:4]) + (f' and {len(names) - 4} more' if len(names) > 4 else '')
  return errors.UnreadableFileError(
    f'{path} holds pickled Python objects besides tensors ({shown}), as an mmengine training '
    'checkpoint does (message_hub, optimizer, param_schedulers). psp-jax never unpickles '
    "them: that runs code from the file. Use a file of tensors only: the model zoo's release "
    "of the weights ({'meta', 'state_dict'}), or, on the machine that trained it, the model's "
    'state_dict saved alone from the training process.'
  )


def _torch_reason(error: BaseException) -> str:
  """What torch.load found wrong, without its advice: torch's message for a file its
  weights-only reader refuses suggests `weights_only=False`, the step that runs the file."""
  text = str(error)
  found = re.search(r'WeightsUnpickler error: ([^\n]*)', text)
  line = found.group(1) if found else (text.strip().splitlines() or [''])[0]
  if 'weights_only' in line or not line.strip():
    return f'{type(error).__name__} (its pickled data is not tensors only)'
  return f'{type(error).__name__}: {line.strip()}'


def read_torch_file(
  path: str | os.PathLike, model_config: Mapping[str, Any] | None = None
) -> TorchCheckpoint:
  """Converts a PyTorch file of any known layout (detect_layout) to Flax variables.

  Args:
    path: .pth file; a state_dict, {'state_dict': ...} or mmseg's {'meta', 'state_dict'},
      keys with or without 'module.'.
    model_config: PSPNet kwargs the weights must fit (PSPNet checkpoints only).
  Raises:
    errors.NotFoundError, errors.UnreadableFileError (not a torch file, or one holding
    pickled objects), semseg.CheckpointMismatchError (unknown layout, or keys off it).
  """
  try:
    import torch  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(f'reading {path} needs PyTorch (pip install torch, CPU build)') from e
  path = as_path(path)
  if not path.is_file():
    raise errors.NotFoundError(f'no such checkpoint file: {path}')
  try:
    with path.open('rb') as f:
      checkpoint = torch.load(f, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    # weights_only refuses a pickled class or function by name ("Unsupported global: GLOBAL
    # mmengine.logging.history_buffer.HistoryBuffer ..."); anything else is a broken file.
    found = re.search(r'Unsupported global: GLOBAL ([\w.]+)', str(e))
    if found:
      raise _unsafe_file(path, found.group(1)) from None
    raise errors.UnreadableFileError(
      f'{path} is not a readable PyTorch checkpoint: {_torch_reason(e)}'
    ) from None
  except Exception as e:
    raise errors.UnreadableFileError(
      f'{path} is not a readable PyTorch checkpoint: {_torch_reason(e)}'
    ) from None
  if not isinstance(checkpoint, Mapping):
    raise semseg.CheckpointMismatchError(
      f'{path} holds a {type(checkpoint).__name__}, not a state_dict.'
    )
  meta = mmseg.dataset_meta(checkpoint)
  try:
    sd = semseg.unwrap_state_dict(checkpoint)
    layout = detect_layout(sd)
    if layout == 'mmseg':
      variables, config = mmseg.from_mmseg_state_dict(sd, model_config)
    elif layout == 'semseg':
      variables, config = semseg.from_torch_state_dict(sd, model_config)
    else:
      variables, config = semseg.backbone_from_torch_state_dict(mmseg.backbone_state_dict(sd) or sd)
  except semseg.CheckpointMismatchError as e:
    raise semseg.CheckpointMismatchError(f'{path}: {e}') from None
  return TorchCheckpoint(variables, config, layout, meta)


def load_torch_file(
  path: str | os.PathLike, model_config: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables, model_config) of a PyTorch file (read_torch_file without the rest).

  For a backbone only {'params': {'backbone'}, 'batch_stats': {'backbone'}} and {depth,
  stem, width}: copy it into a full model (load_backbone or config.init_checkpoint).
  """
  loaded = read_torch_file(path, model_config)
  return loaded.variables, loaded.model_config


def layout_of(model_config: Mapping[str, Any]) -> str:
  """The layout whose files hold this model as it is: 'mmseg' for MMSEG_VARIANT, else semseg."""
  mm = all(model_config.get(k) == v for k, v in mmseg.MMSEG_VARIANT.items())
  return 'mmseg' if mm else 'semseg'


def write_torch_file(
  path: str | os.PathLike,
  variables: Mapping[str, Any],
  model_config: Mapping[str, Any],
  *,
  layout: str | None = None,
  dataset_meta: Mapping[str, Any] | None = None,
) -> None:
  """Writes Flax variables as a .pth that loads strict=True into that layout's PSPNet.

  Args:
    layout: 'semseg' (a bare state_dict) or 'mmseg' ({'meta', 'state_dict'}, as its zoo);
      by default layout_of(model_config).
    dataset_meta: {'classes', 'palette'} for an mmseg file's meta.
  """
  import torch  # noqa: PLC0415

  layout = layout or layout_of(model_config)
  if layout not in LAYOUTS:
    raise errors.UsageError(f'layout {layout!r}: expected one of {LAYOUTS}')
  if layout == 'mmseg':
    out = mmseg.to_mmseg_checkpoint(variables, model_config, dataset_meta)
  else:
    out = semseg.to_torch_state_dict(variables, model_config)
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    torch.save(out, f)
