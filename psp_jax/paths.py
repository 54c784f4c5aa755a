"""Paths that may be local or remote (gs://bucket/...), and the checks of output folders."""

import os
from collections.abc import Iterable

from etils import epath

from psp_jax import errors


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


class OutputPathError(errors.UserError):
  """An output folder that cannot take the results (a file, unwritable, or already used)."""


def check_output_dir(
  path: str | os.PathLike, *, flag: str, files: Iterable[str] = (), overwrite: bool = False
) -> None:
  """Refuses, before any work, an output folder the results could not go to safely.

  Args:
    path: the folder (created later by the writer; remote paths are left to it).
    flag: the command-line flag that named it, for the message.
    files: names (relative to path) the command will write.
    overwrite: whether existing `files` may be replaced.

  Raises:
    OutputPathError: path is a file, or a folder this process cannot write, or holds one of
      `files` and overwrite is False.
  """
  if is_remote(path):
    return
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise OutputPathError(f'{flag} {path} is a file: name a folder (it is created if needed).')
  existing = os.path.dirname(path)
  while not os.path.exists(existing):  # The nearest folder that exists must be writable.
    existing = os.path.dirname(existing)
  probe = path if os.path.isdir(path) else existing
  if not os.access(probe, os.W_OK | os.X_OK):
    raise OutputPathError(f'{flag} {path}: {probe} is not writable; choose another folder.')
  taken = [f for f in files if os.path.exists(os.path.join(path, f))]
  if taken and not overwrite:
    shown = ', '.join(taken[:3]) + (f' and {len(taken) - 3} more' if len(taken) > 3 else '')
    raise OutputPathError(
      f'{flag} {path} already holds {shown}: pass --overwrite to replace them, or choose '
      'another folder. Nothing was written.'
    )
