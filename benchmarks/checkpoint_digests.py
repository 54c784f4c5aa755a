"""What checkpoint digests cost: sha256 of a PSPNet-50 TrainState at save and restore.

  .venv/bin/python benchmarks/checkpoint_digests.py [--depth 50] [--reps 3] [--out FILE.md]

Makes the ADE20K recipe's TrainState (parameters, BatchNorm statistics, SGD momentum) on the
CPU, then times, in a temporary workdir, the digests alone (digests.of_tree: what a save
adds and what a restore adds), Checkpoints.save to disk (synchronous, digests included),
Checkpoints.restore (verification included), and restore_newest, which a resume runs (every
array read once first by orbax_reads.check_readable, then restored and verified). Prints a
Markdown table; --out writes it too.
The figures are this machine's (CPU, its disk); on a TPU VM the state is first copied from
the chips, as orbax's own save does.
"""

import argparse
import datetime
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def timed(fn, reps: int) -> float:
  """Median seconds of reps calls of fn."""
  times = []
  for _ in range(reps):
    started = time.perf_counter()
    fn()
    times.append(time.perf_counter() - started)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--depth', type=int, default=50)
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--out', help='also write the table to this Markdown file')
  args = parser.parse_args()
  sys.path.insert(0, str(ROOT))
  import jax  # noqa: PLC0415 (after sys.path is set)

  from configs import ade20k  # noqa: PLC0415
  from psp_jax import digests, distributed, orbax_reads  # noqa: PLC0415
  from psp_jax.train import checkpointing, train_state, training  # noqa: PLC0415

  config = ade20k.get_config()
  config.model.depth = args.depth
  mesh = distributed.create_mesh(jax.devices()[:1])
  program = training.build(config, mesh, 'cpu', 1000)
  state, _ = train_state.create_train_state(
    program.model, program.tx, program.init_key, program.image_shape, mesh
  )
  jax.block_until_ready(state)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  arrays = len(jax.tree.leaves(state))

  with tempfile.TemporaryDirectory() as workdir:
    ckpts = checkpointing.Checkpoints(workdir, keep=args.reps + 1, async_save=False)
    digest_s = timed(lambda: digests.of_tree(state), args.reps)
    steps = iter(range(1, args.reps + 1))

    def save():
      ckpts.save(state.replace(step=jax.numpy.int32(next(steps))), program.model_config)
      ckpts.wait()

    save_s = timed(save, args.reps)
    read_s = timed(lambda: orbax_reads.check_readable(f'{workdir}/checkpoints/1/state'), args.reps)
    restore_s = timed(lambda: jax.block_until_ready(ckpts.restore(program.state)), args.reps)
    newest_s = timed(lambda: jax.block_until_ready(ckpts.restore_newest(program.state)), args.reps)
    ckpts.close()

  rows = [
    ('digests (sha256 of every array)', digest_s),
    ('Checkpoints.save, to disk (digests included)', save_s),
    ('Checkpoints.restore (verification included)', restore_s),
    ('Checkpoints.restore_newest (read first, restore, verify: a resume)', newest_s),
  ]
  lines = [
    f'PSPNet-{args.depth} TrainState of the ADE20K recipe: {arrays} arrays, '
    f'{nbytes / 1e9:.3f} GB; {os.cpu_count()} CPUs, median of {args.reps}.',
    '',
    "| what | s | digests' share |",
    '|---|---:|---:|',
    f'| {rows[0][0]} | {digest_s:.2f} | - |',
    *(f'| {what} | {s:.2f} | {100 * digest_s / s:.0f}% |' for what, s in rows[1:]),
    '',
    f'sha256 rate: {nbytes / digest_s / 1e9:.2f} GB/s. Reading every array once before orbax '
    f'does (orbax_reads.check_readable, so that a damaged file fails before orbax reads it): '
    f'{read_s:.2f} s.',
  ]
  text = '\n'.join(lines)
  print(text)
  if args.out:
    head = f'# What checkpoint digests cost ({datetime.date.today()})\n\n'
    head += f'`{" ".join(["benchmarks/checkpoint_digests.py", *sys.argv[1:]])}`\n\n'
    pathlib.Path(args.out).write_text(head + text + '\n')


if __name__ == '__main__':
  main()
