"""PyTorch files: official PSPNet checkpoints and ImageNet backbones, read and written.

torch is imported only when a file is read or written, so the rest of psp_jax runs without it.
"""

import os
from collections.abc import Mapping
from typing import Any

from psp_jax import errors
from psp_jax.interop import semseg
from psp_jax.paths import as_path


def load_torch_file(
  path: str | os.PathLike, model_config: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Flax variables of a PyTorch file: an official PSPNet checkpoint or an ImageNet backbone.

  Args:
    path: .pth file (torch.load with weights_only=True: tensors and plain containers).
    model_config: PSPNet kwargs the weights must fit (PSPNet checkpoints only).
  Returns:
    (variables, model_config). For a backbone only {'params': {'backbone'}, 'batch_stats':
    {'backbone'}} and {depth, stem, width}: copy it into a full model (load_backbone or
    config.init_checkpoint).
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
  except Exception as e:
    raise errors.UnreadableFileError(f'{path} is not a readable PyTorch checkpoint: {e}') from e
  if not isinstance(checkpoint, Mapping):
    raise semseg.CheckpointMismatchError(
      f'{path} holds a {type(checkpoint).__name__}, not a state_dict.'
    )
  sd = semseg.unwrap_state_dict(checkpoint)
  try:
    if not any(k.startswith(('cls.', 'aux.', 'ppm.')) for k in sd):
      variables, config = semseg.backbone_from_torch_state_dict(sd)
    else:
      variables, config = semseg.from_torch_state_dict(sd, model_config)
  except semseg.CheckpointMismatchError as e:
    raise semseg.CheckpointMismatchError(f'{path}: {e}') from None
  return variables, config


def write_torch_file(
  path: str | os.PathLike, variables: Mapping[str, Any], model_config: Mapping[str, Any]
) -> None:
  """Writes the official state_dict of Flax variables to a .pth file (loads strict=True)."""
  import torch  # noqa: PLC0415

  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    torch.save(semseg.to_torch_state_dict(variables, model_config), f)
