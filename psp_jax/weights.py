"""Model weights on disk: save/load {'params', 'batch_stats'} + model_config, any source.

  variables, model_config = load_variables('runs/synthetic')   # any checkpoint kind

load_variables reads a training workdir, one of its step directories, a weights directory
(save_variables, `python -m psp_jax.convert`) or a PyTorch .pth, whole or not at all
(DamagedCheckpointError). The kinds and what is read from each: docs/design.md#checkpoints
"""

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from psp_jax import digests, errors, orbax_reads
from psp_jax.interop import pth, semseg
from psp_jax.models import codec
from psp_jax.paths import as_path

VARIABLES_DIR, CONFIG_FILE = 'variables', 'model_config.json'
META_FILE = 'dataset_meta.json'  # {'classes': [...], 'palette': [[r, g, b], ...]}
# A training workdir: LATEST_DIR/<step>/ (the newest TrainStates) and BEST_DIR/<step>/ (the
# best weights), each step holding the orbax items STATE_ITEM and MODEL_CONFIG_ITEM
# (psp_jax.train.checkpointing writes them), and beside them RUN_CONFIG_FILE, the resolved
# experiment config, and CONFIG_FILE (psp_jax.train.summaries).
LATEST_DIR, BEST_DIR = 'checkpoints', 'best'
STATE_ITEM, MODEL_CONFIG_ITEM = 'state', 'model_config'
RUN_CONFIG_FILE = 'config.json'
TRAIN_DIRS = (BEST_DIR, LATEST_DIR)  # load_variables looks in this order
COLLECTIONS = ('params', 'batch_stats')
REASON_CHARS = 240  # of an error's first line in a message: tensorstore's run to kilobytes


class DamagedCheckpointError(errors.UnreadableFileError):
  """A checkpoint whose files cannot be read whole (truncated, garbled or deleted)."""


class Checkpoint(NamedTuple):
  """A checkpoint as load_checkpoint reads it."""

  variables: dict[str, Any]  # {'params', 'batch_stats'} of numpy arrays
  model_config: dict[str, Any]  # PSPNet kwargs
  dataset_meta: dict[str, list] | None  # {'classes', 'palette'} the weights came with


def reason(error: BaseException) -> str:
  """'Type: first line' of the innermost cause of error, cut to REASON_CHARS characters.

  Orbax wraps tensorstore's error (which says what is wrong with which file) in a generic
  one whose text is a page of tensorstore spec, so the innermost cause is the useful one.
  """
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  text = type(error).__name__ + (f': {lines[0]}' if lines else '')
  return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + '...'


def save_variables(
  path: str | os.PathLike,
  variables: Mapping[str, Any],
  model_config: Mapping[str, Any],
  *,
  force: bool = False,
  dataset_meta: Mapping[str, Any] | None = None,
) -> None:
  """Writes a weights directory (orbax variables + model_config.json).

  Args:
    path: directory to create; an existing non-empty one needs force=True.
    variables: {'params', 'batch_stats'} (numpy or jax arrays).
    model_config: JSON-serialisable PSPNet kwargs.
    dataset_meta: {'classes', 'palette'} to keep beside them (dataset_meta.json).
  """
  path = as_path(path)
  if path.exists() and any(path.iterdir()):
    if not force:
      raise errors.OutputExistsError(
        f'{path} exists and is not empty (pass force=True / --force to replace it).'
      )
    path.rmtree()
  path.mkdir(parents=True, exist_ok=True)
  tree = {c: _as_numpy(variables[c]) for c in COLLECTIONS}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path / VARIABLES_DIR, tree)
  checkpointer.wait_until_finished()
  (path / digests.FILE).write_text(json.dumps(digests.of_tree(tree), indent=1) + '\n')
  write_model_config(path, model_config)
  if dataset_meta:
    (path / META_FILE).write_text(json.dumps(dict(dataset_meta)) + '\n')


def fit_dataset_meta(
  meta: Mapping[str, Any] | None, num_classes: int | None, source: Any
) -> dict[str, list] | None:
  """meta if its classes (and palette) fit the model's num_classes, else None (warned)."""
  if not meta or num_classes is None:
    return None
  names, palette = list(meta.get('classes') or ()), meta.get('palette')
  if len(names) != int(num_classes):
    logging.warning(
      '%s: its meta names %d classes, the model predicts %d; not using those names.',
      source,
      len(names),
      num_classes,
    )
    return None
  out = {'classes': [str(n) for n in names]}
  if palette is not None and np.shape(palette) == (len(names), 3):
    out['palette'] = np.asarray(palette, np.int64).tolist()
  return out


def write_model_config(directory: epath.Path, model_config: Mapping[str, Any]) -> None:
  """DIR/model_config.json: the model config as psp_jax.models.codec encodes it."""
  text = json.dumps(codec.encode(model_config), indent=2, sort_keys=True) + '\n'
  (directory / CONFIG_FILE).write_text(text)


def _read_model_config(path: epath.Path) -> dict[str, Any]:
  try:
    return dict(json.loads(path.read_text()))
  except (ValueError, TypeError) as e:
    raise errors.InvalidInputError(
      f'{path} is not a model config (JSON of PSPNet arguments): {e}'
    ) from e


def _as_numpy(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _as_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def _restore_numpy(path: epath.Path) -> dict[str, Any]:
  """params and batch_stats of an orbax pytree checkpoint as numpy (other items not read)."""
  # The handler, not a Checkpointer: that one warns that a step's state/ has no step
  # metadata file (it never has), and turns unreadable tree metadata into None.
  handler = ocp.PyTreeCheckpointHandler()
  try:
    with _reading(path):
      orbax_reads.check_readable(path)  # Before orbax reads any of it: see there.
      tree = handler.metadata(path).tree
    missing = [c for c in COLLECTIONS if c not in tree]
    if missing:
      raise errors.InvalidInputError(
        f'{path} holds {sorted(tree)}, not {missing}: not a model checkpoint.'
      )
    item = {c: tree[c] for c in COLLECTIONS}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    with _reading(path):
      return handler.restore(
        path,
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
      )
  finally:
    handler.close()


@contextlib.contextmanager
def _reading(path: epath.Path) -> Iterator[None]:
  """Turns any error while reading path's files into one DamagedCheckpointError naming it."""
  try:
    yield
  except Exception as e:  # orbax raises a bare Exception for an unreadable array.
    orbax_reads.quiet_abandoned_reads()
    raise DamagedCheckpointError(
      f'{path} cannot be read ({reason(e)}): a file of it is truncated, garbled or missing. '
      'Copy or convert it again, or choose another checkpoint.'
    ) from e


def saved_digests(directory: str | os.PathLike) -> dict[str, Any] | None:
  """The digests saved with a checkpoint (digests.py), None if it was written without them.

  directory: a step directory (its digests item) or a weights directory (digests.json).
  """
  directory = as_path(directory)
  item, file = directory / digests.ITEM, directory / digests.FILE
  if item.is_dir():
    with _reading(item):
      return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(item))
  if not file.is_file():
    return None
  try:
    return dict(json.loads(file.read_text()))
  except (ValueError, TypeError) as e:
    raise DamagedCheckpointError(
      f'{file} cannot be read ({reason(e)}): copy the weights again.'
    ) from e


def verify(tree: Any, directory: str | os.PathLike) -> None:
  """Checks arrays restored from a checkpoint against the digests saved with them.

  A checkpoint written before digests existed passes, with one warning that says so.

  Args:
    tree: what was restored (a TrainState, or a dict of some of its collections).
    directory: the checkpoint it came from (see saved_digests).

  Raises:
    DamagedCheckpointError: naming the checkpoint and the first array that differs.
  """
  saved = saved_digests(directory)
  if saved is None:
    logging.warning(
      '%s has no digests (it was written before psp-jax recorded them): its arrays are used '
      'unchecked.',
      directory,
    )
    return
  differing = digests.mismatches(tree, saved)
  if differing:
    raise DamagedCheckpointError(
      f'{directory} is damaged: {digests.describe(differing)} differ from the digest saved '
      'with it (its bytes changed on disk after it was written). Copy it again from where it '
      'was written, or choose another checkpoint.'
    )


def step_numbers(directory: epath.Path) -> list[int]:
  """The steps of a directory of orbax step directories (checkpoints/, best/), ascending."""
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _read_step_dir(step_dir: epath.Path) -> tuple[dict[str, Any], dict[str, Any]]:
  """A training step directory: state (orbax) + model_config (orbax JSON item)."""
  variables = _restore_numpy(step_dir / STATE_ITEM)
  verify(variables, step_dir)
  config_dir = step_dir / MODEL_CONFIG_ITEM
  if config_dir.is_dir():
    with _reading(config_dir):
      config = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(config_dir)
  elif (step_dir.parent.parent / CONFIG_FILE).is_file():
    config = _read_model_config(step_dir.parent.parent / CONFIG_FILE)
  else:
    raise errors.NotFoundError(
      f'{step_dir} has no model_config item and its workdir no {CONFIG_FILE}'
    )
  return variables, dict(config)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
  """load_variables and the class names / palette the checkpoint came with (or None).

  They are those of an mmseg .pth's meta, or of a weights dir's dataset_meta.json (what
  psp_jax.convert kept of them), when they fit the model's number of classes.
  """
  path = as_path(path)
  meta = None
  if path.is_file():
    loaded = pth.read_torch_file(path)
    variables, config, meta = loaded.variables, loaded.model_config, loaded.dataset_meta
  else:
    variables, config = load_variables(path)
    if (path / META_FILE).is_file():
      try:
        meta = json.loads((path / META_FILE).read_text())
      except ValueError as e:
        raise errors.InvalidInputError(f'{path / META_FILE} is not JSON: {e}') from e
  return Checkpoint(variables, config, fit_dataset_meta(meta, config.get('num_classes'), path))


def load_variables(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables, model_config) of a weights dir, training workdir, step dir or .pth file.

  Args:
    path: a checkpoint of any kind; a workdir gives its best checkpoint, else the newest,
      skipping damaged ones with one warning (docs/design.md#checkpoints).
  Returns:
    ({'params', 'batch_stats'} of numpy arrays, PSPNet kwargs).
  Raises:
    DamagedCheckpointError: a weights or step directory that cannot be read whole, or a
      workdir none of whose checkpoints can (the message lists each and why).
    errors.NotFoundError: path is no checkpoint at all (a FileNotFoundError).
  """
  path = as_path(path)
  if path.is_file():
    return pth.load_torch_file(path)
  if not path.is_dir():
    raise errors.NotFoundError(f'no such checkpoint file or directory: {path}')
  if (path / VARIABLES_DIR).is_dir():
    if not (path / CONFIG_FILE).is_file():
      raise errors.NotFoundError(f'{path} has {VARIABLES_DIR}/ but no {CONFIG_FILE}')
    config = _read_model_config(path / CONFIG_FILE)
    variables = _restore_numpy(path / VARIABLES_DIR)
    verify(variables, path)
    return variables, config
  if (path / STATE_ITEM).is_dir():  # The user named this step: no fallback.
    return _read_step_dir(path)
  candidates = [
    path / sub / str(step) for sub in TRAIN_DIRS for step in step_numbers(path / sub)[::-1]
  ]
  if not candidates:
    raise errors.NotFoundError(
      f'{path} is not a checkpoint: expected {VARIABLES_DIR}/ + {CONFIG_FILE} (psp_jax.convert), '
      'a training workdir (best/<step> or checkpoints/<step>), a step directory (state/), or a '
      '.pth file.'
    )
  skipped = []
  for step_dir in candidates:
    name = f'{step_dir.parent.name}/{step_dir.name}'
    try:
      found = _read_step_dir(step_dir)
    # DamagedCheckpointError (an OSError), or a step without its model_config (OSError) or
    # whose state is no model's (ValueError).
    except (OSError, ValueError) as e:
      skipped.append(f'{name} ({reason(e)})')
      continue
    if skipped:
      logging.warning(
        'Damaged checkpoint(s) in %s skipped: %s; using %s instead.', path, '; '.join(skipped), name
      )
    return found
  raise DamagedCheckpointError(
    f'No checkpoint in {path} can be read; tried {"; ".join(skipped)}. Copy the workdir again '
    'from where it was written, or train again.'
  )


def convert(
  src: str | os.PathLike,
  dst: str | os.PathLike,
  *,
  expect: Mapping[str, Any] | None = None,
  force: bool = False,
  layout: str | None = None,
) -> None:
  """src .pth (semseg or mmseg layout, recognised) -> dst weights dir, or src checkpoint
  (dir) -> dst .pth in `layout`.

  Args:
    expect: PSPNet kwargs the weights must have (e.g. {'depth': 101}); also bins.
    force: overwrite dst.
    layout: of the .pth written: 'semseg' or 'mmseg'; by default the one that holds the model
      as it is (mmseg for a model with its variant, pth.layout_of).
  """
  src, dst = as_path(src), as_path(dst)
  if not src.exists():
    raise errors.NotFoundError(f'no such file or directory: {src}')
  if src.is_file():
    loaded = pth.read_torch_file(src, expect or None)
    if loaded.layout == 'backbone':
      raise errors.InvalidInputError(
        f'{src} is an ImageNet backbone, not a PSPNet: nothing to convert.'
      )
    meta = fit_dataset_meta(loaded.dataset_meta, loaded.model_config.get('num_classes'), src)
    save_variables(dst, loaded.variables, loaded.model_config, force=force, dataset_meta=meta)
    return
  variables, config, meta = load_checkpoint(src)
  for key, value in (expect or {}).items():
    if key in config and config[key] != value:
      raise semseg.CheckpointMismatchError(f'{src} has {key}={config[key]}, not {value}.')
  if dst.exists() and not force:
    raise errors.OutputExistsError(f'{dst} exists (pass --force to overwrite it).')
  pth.write_torch_file(dst, variables, config, layout=layout, dataset_meta=meta)
