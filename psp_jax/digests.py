"""sha256 digests of checkpoint arrays and exported model files: recorded when written, checked
when read.

Orbax and tensorstore check a checkpoint's manifest, not its array data: bytes flipped
inside an array file (bit rot, a bad copy) restore as other numbers, without an error. So
every checkpoint this project writes (a training step, best/, a converted weights dir)
records one digest per array of the values it saves, and every read compares the values
it restored with them before they are used (docs/design.md#checkpoints).

A digest covers an array's dtype, shape and bytes (C order). Names are the tree's keys
joined by '/', the same for a TrainState and for the {'params', 'batch_stats'} dict a
reader restores ('params/backbone/conv1/kernel'). An exported model's serving.json records
the digest of each of its files (of_files) in the same way.
"""

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from psp_jax import distributed

ALGORITHM = 'sha256'
ITEM = 'digests'  # the orbax JSON item of a training or best/ step
FILE = 'digests.json'  # beside a weights dir's variables/ (psp_jax.convert)


def _name(path: tuple[Any, ...]) -> str:
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):  # DictKey, GetAttrKey, SequenceKey
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def _host(x: Any) -> np.ndarray:
  """An array's whole value on this host: a replicated jax.Array's first local copy."""
  if isinstance(x, jax.Array):
    if x.is_fully_replicated:
      x = x.addressable_data(0)
    elif not x.is_fully_addressable:  # Sharded over processes: every process gets it all.
      x = distributed.allgather(x, 'digest', tiled=True)
  return np.ascontiguousarray(np.asarray(x))


def of_array(x: Any) -> str:
  """The hex digest of one array's dtype, shape and bytes."""
  value = _host(x)
  h = hashlib.new(ALGORITHM)
  h.update(f'{value.dtype.str}{value.shape}'.encode())
  h.update(value.reshape(-1).view(np.uint8))
  return h.hexdigest()


def of_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  """The hex digest of a file's bytes (an exported model's files: serving.json records them)."""
  h = hashlib.new(ALGORITHM)
  with open(path, 'rb') as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def of_files(root: str | os.PathLike, names: Sequence[str]) -> dict[str, str]:
  """{path relative to root: hex digest} of the files named (folders: every file in them)."""
  root, found = os.fspath(root), {}
  for name in names:
    path = os.path.join(root, name)
    if os.path.isdir(path):
      for folder, _, files in os.walk(path):
        for file in files:
          full = os.path.join(folder, file)
          found[os.path.relpath(full, root)] = of_file(full)
    elif os.path.isfile(path):
      found[name] = of_file(path)
  return dict(sorted(found.items()))


def of_tree(tree: Any) -> dict[str, Any]:
  """{'algorithm', 'arrays': {name: hex digest}} of every array leaf of tree."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  arrays = {_name(path): of_array(x) for path, x in leaves if hasattr(x, 'shape')}
  return {'algorithm': ALGORITHM, 'arrays': arrays}


def mismatches(tree: Any, recorded: Mapping[str, Any]) -> list[str]:
  """Names of tree's arrays whose values differ from `recorded` (of_tree at save time).

  An array the record does not name counts as a mismatch: the record is of another tree.
  """
  if recorded.get('algorithm') != ALGORITHM or not isinstance(recorded.get('arrays'), Mapping):
    return ['(the digest record itself: not one this version writes)']
  saved = recorded['arrays']
  now = of_tree(tree)['arrays']
  return sorted(name for name, digest in now.items() if saved.get(name) != digest)


def describe(names: list[str]) -> str:
  """'params/a/kernel' or 'params/a/kernel and 3 more arrays' for a message."""
  return names[0] + (f' and {len(names) - 1} more arrays' if len(names) > 1 else '')
