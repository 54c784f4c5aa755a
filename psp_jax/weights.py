"""Model weights on disk: save/load {'params', 'batch_stats'} + model_config, any source.

A weights directory (what `python -m psp_jax.convert X.pth DIR` and save_variables write):

  DIR/variables/          orbax checkpoint of {'params', 'batch_stats'} (numpy leaves)
  DIR/model_config.json   psp_jax.models.PSPNet keyword arguments

load_variables also reads a training workdir (its best checkpoint by validation mIoU, else
the newest; see psp_jax.train.checkpoints), one step directory of it, and PyTorch files: official
PSPNet checkpoints and ImageNet ResNet backbones, converted on the fly (psp_jax.convert).
Paths may be local or remote (gs://bucket/..., through etils.epath as orbax reads them).
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from psp_jax.interop import pth, semseg
from psp_jax.models import codec
from psp_jax.paths import as_path

VARIABLES_DIR, CONFIG_FILE = 'variables', 'model_config.json'
# The resolved experiment config a training run writes beside its checkpoints (summaries.py).
RUN_CONFIG_FILE = 'config.json'
TRAIN_DIRS = ('best', 'checkpoints')  # psp_jax.train.checkpoints.BEST_DIR, LATEST_DIR
COLLECTIONS = ('params', 'batch_stats')


def save_variables(
  path: str | os.PathLike,
  variables: Mapping[str, Any],
  model_config: Mapping[str, Any],
  *,
  force: bool = False,
) -> None:
  """Writes a weights directory (orbax variables + model_config.json).

  Args:
    path: directory to create; an existing non-empty one needs force=True.
    variables: {'params', 'batch_stats'} (numpy or jax arrays).
    model_config: JSON-serialisable PSPNet kwargs.
  """
  path = as_path(path)
  if path.exists() and any(path.iterdir()):
    if not force:
      raise FileExistsError(f'{path} exists and is not empty (pass force=True / --force).')
    path.rmtree()
  path.mkdir(parents=True, exist_ok=True)
  tree = {c: _as_numpy(variables[c]) for c in COLLECTIONS}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / VARIABLES_DIR, tree)
  checkpointer.wait_until_finished()
  write_model_config(path, model_config)


def write_model_config(directory: epath.Path, model_config: Mapping[str, Any]) -> None:
  """DIR/model_config.json: the model config as psp_jax.models.codec encodes it."""
  text = json.dumps(codec.encode(model_config), indent=2, sort_keys=True) + '\n'
  (directory / CONFIG_FILE).write_text(text)


def _read_model_config(path: epath.Path) -> dict[str, Any]:
  try:
    return dict(json.loads(path.read_text()))
  except (ValueError, TypeError) as e:
    raise ValueError(f'{path} is not a model config (JSON of PSPNet arguments): {e}') from e


def _as_numpy(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _as_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def _restore_numpy(path: epath.Path) -> dict[str, Any]:
  """params and batch_stats of an orbax pytree checkpoint as numpy (other items not read)."""
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  missing = [c for c in COLLECTIONS if c not in tree]
  if missing:
    raise ValueError(f'{path} holds {sorted(tree)}, not {missing}: not a model checkpoint.')
  item = {c: tree[c] for c in COLLECTIONS}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  return checkpointer.restore(
    path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
  )


def _steps(directory: epath.Path) -> list[int]:
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _read_step_dir(step_dir: epath.Path) -> tuple[dict[str, Any], dict[str, Any]]:
  """A training step directory: state (orbax) + model_config (orbax JSON item)."""
  variables = _restore_numpy(step_dir / 'state')
  config_dir = step_dir / 'model_config'
  if config_dir.is_dir():
    config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(config_dir)
  elif (step_dir.parent.parent / CONFIG_FILE).is_file():
    config = _read_model_config(step_dir.parent.parent / CONFIG_FILE)
  else:
    raise FileNotFoundError(f'{step_dir} has no model_config item and its workdir no {CONFIG_FILE}')
  return variables, dict(config)


def load_variables(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables, model_config) of a weights dir, training workdir, step dir or .pth file.

  Args:
    path: see the module docstring. A training workdir gives its best checkpoint (by
      validation mIoU) if it has one, else the newest.
  Returns:
    ({'params', 'batch_stats'} of numpy arrays, PSPNet kwargs).
  """
  path = as_path(path)
  if path.is_file():
    return pth.load_torch_file(path)
  if not path.is_dir():
    raise FileNotFoundError(f'no such checkpoint file or directory: {path}')
  if (path / VARIABLES_DIR).is_dir():
    if not (path / CONFIG_FILE).is_file():
      raise FileNotFoundError(f'{path} has {VARIABLES_DIR}/ but no {CONFIG_FILE}')
    config = _read_model_config(path / CONFIG_FILE)
    return _restore_numpy(path / VARIABLES_DIR), config
  if (path / 'state').is_dir():
    return _read_step_dir(path)
  for sub in TRAIN_DIRS:
    steps = _steps(path / sub)
    if steps:
      return _read_step_dir(path / sub / str(steps[-1]))
  raise FileNotFoundError(
    f'{path} is not a checkpoint: expected {VARIABLES_DIR}/ + {CONFIG_FILE} (psp_jax.convert), '
    'a training workdir (best/<step> or checkpoints/<step>), a step directory (state/), or a '
    '.pth file.'
  )


def convert(
  src: str | os.PathLike,
  dst: str | os.PathLike,
  *,
  expect: Mapping[str, Any] | None = None,
  force: bool = False,
) -> None:
  """src .pth -> dst weights dir, or src checkpoint (dir) -> dst official .pth.

  Args:
    expect: PSPNet kwargs the weights must have (e.g. {'depth': 101}); also bins.
    force: overwrite dst.
  """
  src, dst = as_path(src), as_path(dst)
  if not src.exists():
    raise FileNotFoundError(f'no such file or directory: {src}')
  if src.is_file():
    variables, config = pth.load_torch_file(src, expect or None)
    if 'cls' not in variables['params']:
      raise ValueError(f'{src} is an ImageNet backbone, not a PSPNet: nothing to convert.')
    save_variables(dst, variables, config, force=force)
    return
  variables, config = load_variables(src)
  for key, value in (expect or {}).items():
    if key in config and config[key] != value:
      raise semseg.CheckpointMismatchError(f'{src} has {key}={config[key]}, not {value}.')
  if dst.exists() and not force:
    raise FileExistsError(f'{dst} exists (pass --force to overwrite).')
  pth.write_torch_file(dst, variables, config)
