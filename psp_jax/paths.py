"""Paths that may be local or remote (gs://bucket/...), as orbax and etils.epath read them."""

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """Whether path names a remote file system (gs://bucket/...), not a local one."""
  return '://' in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """A local path made absolute, or a remote one (gs://bucket/...) as it is.

  os.path.abspath or pathlib would turn gs://bucket/run into ./gs:/bucket/run, a local
  folder: checkpoints on a TPU VM's own disk are lost with the VM.
  """
  path = os.fspath(path)
  return epath.Path(path if is_remote(path) else os.path.abspath(path))
