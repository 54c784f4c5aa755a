"""Runs train.py with a fault injected, for the tests: `python tests/faults.py TRAIN_ARGS...`.

The faults are chosen by environment variables, read here only (train.py knows nothing):

  FAULT_NAN_AT_STEP=N      the images of step N (1-based) become NaN inside the compiled
                           step, so its loss is NaN as a numerical blow-up would make it;
  FAULT_HANG_SAVE_AT_STEP=N  the save of checkpoint N writes every file, then hangs just
                           before orbax renames it into place, after touching the file
                           FAULT_MARKER; a test then kills the process with SIGKILL.

  FAULT_FILL_DISK_AT_STEP=N  once the saves before checkpoint N are complete, and just
                           before it, the file FAULT_FILLER grows until its file system
                           is full, as another program filling the disk would (the file
                           stays: the test removes it).

  FAULT_LATE_PROCESS=I:S   process I builds its train step S seconds after the others, as
                           a process whose restore or compile takes longer would.

`damage(tree_dir, how)` damages a written checkpoint as a disk, a copy or a user can
(tests/test_checkpoint_damage.py).
"""

import os
import pathlib
import runpy
import sys
import time

# A script that starts before train.py's own start-up: it imports no JAX, TensorFlow or
# tests/helpers.py at the top, so the run it wraps begins as a user's does.
TRAIN_PY = pathlib.Path(__file__).resolve().parents[1] / 'train.py'


def poison_step(step: int) -> None:
  """Makes train_step.make_train_step's step feed NaN images at optimiser step `step`."""
  import jax.numpy as jnp  # noqa: PLC0415 (only when this fault is asked for: see TRAIN_PY)

  from psp_jax.train import train_step  # noqa: PLC0415 (as above)

  make = train_step.make_train_step

  def make_poisoned(*args, **kwargs):
    inner = make(*args, **kwargs)

    def poisoned(state, batch, rng):
      image = jnp.where(state.step + 1 == step, jnp.nan, batch['image'])
      return inner(state, dict(batch, image=image), rng)

    return poisoned

  train_step.make_train_step = make_poisoned


def hang_save(step: int, marker: str) -> None:
  """Makes the commit of checkpoints/<step> hang forever once its files are written."""
  from orbax.checkpoint._src.path import atomicity  # noqa: PLC0415 (as in poison_step)

  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize_or_hang(self):
    final = self.get_final()
    if final.name == str(step) and final.parent.name == 'checkpoints':
      pathlib.Path(marker).write_text(str(self.get()))
      while True:  # Blocks the commit thread; the main thread waits for it at exit.
        time.sleep(1)
    return await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_hang


def fill_disk_before_save(step: int, filler: str) -> None:
  """Makes the save of checkpoint `step` find its file system full."""
  from psp_jax.train import checkpointing  # noqa: PLC0415 (as in poison_step)

  save = checkpointing.Checkpoints.save

  def fill_then_save(self, state, model_config):
    if int(state.step) == step:
      self.wait()  # The checkpoints before it are complete: the disk fills between two.
      with open(filler, 'wb') as f:
        try:
          while True:
            f.write(b'\0' * 65536)
            f.flush()
        except OSError:  # ENOSPC: the disk is full.
          pass
    return save(self, state, model_config)

  checkpointing.Checkpoints.save = fill_then_save


def late_process(index: int, seconds: float) -> None:
  """Makes process `index` build its train step `seconds` late (before it compiles it)."""
  import jax  # noqa: PLC0415 (as in poison_step)

  from psp_jax.train import train_step  # noqa: PLC0415 (as above)

  compile_step = train_step.compile_train_step

  def compile_late(*args, **kwargs):
    if jax.process_index() == index:
      time.sleep(seconds)
    return compile_step(*args, **kwargs)

  train_step.compile_train_step = compile_late


DAMAGES = ('truncated', 'garbled', 'deleted')


def damage(tree_dir: pathlib.Path, how: str) -> pathlib.Path:
  """Damages one file of an orbax tree (a step's state/, a weights dir's variables/).

  Args:
    tree_dir: the tree's directory.
    how: one of DAMAGES:

      truncated: the largest file (array data) cut to half, as an interrupted copy leaves it;
      garbled: 16 bytes of the OCDBT manifest flipped (bit rot). It is checksummed; array
        data is not, so flipped bytes there can go unnoticed (orbax stores no checksum);
      deleted: the largest file removed, so its arrays have no data at all;
      flipped (not in DAMAGES: orbax reads it without an error): 16 bytes in the middle of
        the largest array chunk the tree refers to xor'ed, as bit rot leaves array data; on
        incompressible arrays (stored as they are) the restore gives other numbers, which
        only digests catch. (The middle of the largest file could be bytes no version
        refers to any more: a flip there changed nothing, seen on 2026-12-07.)

  Returns:
    The damaged file's path.
  """
  files = [p for p in tree_dir.rglob('*') if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  if how == 'truncated':
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    return largest
  if how == 'deleted':
    largest.unlink()
    return largest
  assert how in ('garbled', 'flipped'), how
  if how == 'garbled':
    target = tree_dir / 'manifest.ocdbt'
    middle = target.stat().st_size // 2
  else:
    target, offset, length = largest_chunk(tree_dir)
    middle = offset + length // 2
  data = bytearray(target.read_bytes())
  data[middle : middle + 16] = bytes(b ^ 0x5A for b in data[middle : middle + 16])
  target.write_bytes(bytes(data))
  return target


def largest_chunk(tree_dir: pathlib.Path) -> tuple[pathlib.Path, int, int]:
  """(data file, offset, length) of the largest array chunk an orbax tree's newest OCDBT
  version refers to (tensorstore's dump of its root node)."""
  import tensorstore as ts  # noqa: PLC0415 (as in poison_step)

  (base,) = tree_dir.glob('ocdbt.process_*')
  store = ts.KvStore.open(f'file://{base}/').result()
  version = ts.ocdbt.dump(store).result()['versions'][-1]
  assert version['root_height'] == 0, 'a tree of more than one node: walk its children'
  node = ts.ocdbt.dump(store, version['root']['location']).result()
  chunks = [e['indirect_value'].split('::', 1)[1] for e in node['entries'] if 'indirect_value' in e]
  name, offset, length = max((c.rsplit(':', 2) for c in chunks), key=lambda c: int(c[2]))
  return base / name, int(offset), int(length)


def main() -> None:
  train_py = str(TRAIN_PY)
  sys.argv = [train_py, *sys.argv[1:]]
  sys.path.insert(0, str(TRAIN_PY.parent))  # Before the faults import psp_jax: this tree's.
  if 'FAULT_NAN_AT_STEP' in os.environ:
    poison_step(int(os.environ['FAULT_NAN_AT_STEP']))
  if 'FAULT_FILL_DISK_AT_STEP' in os.environ:
    fill_disk_before_save(int(os.environ['FAULT_FILL_DISK_AT_STEP']), os.environ['FAULT_FILLER'])
  if 'FAULT_HANG_SAVE_AT_STEP' in os.environ:
    hang_save(int(os.environ['FAULT_HANG_SAVE_AT_STEP']), os.environ['FAULT_MARKER'])
  if 'FAULT_LATE_PROCESS' in os.environ:
    index, seconds = os.environ['FAULT_LATE_PROCESS'].split(':')
    late_process(int(index), float(seconds))
  runpy.run_path(train_py, run_name='__main__')


if __name__ == '__main__':
  main()
