"""A/B timing of the JAX train step under variants of the CPU code paths (benchmarks/NOTES.md).

  .venv/bin/python benchmarks/step_variants.py [--batch 2] [--crop 233] [--reps 3]

Each variant (a value of psp_jax.models.cpu_conv_grad.CPU_DOT_WEIGHT_GRAD_KERNELS) is compiled as
the project's real train step on the same weights and batch; the compiled steps then run in
turn, `reps` times each, in one process, so a change of machine load hits all of them.
Prints the median step time of each and the largest relative difference of its first update
from the first variant's.
"""

import argparse
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from psp_jax import distributed  # noqa: E402
from psp_jax.models import codec

distributed.set_cpu_xla_flags()
import jax  # noqa: E402

from psp_jax.models import cpu_conv_grad  # noqa: E402
from psp_jax.train import optim, train_state, train_step  # noqa: E402

VARIANTS = {'XLA weight grads': (), '1x1 as dots': (1,), '1x1 and 3x3 as dots': (1, 3)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--crop', type=int, default=233)
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
  args = parser.parse_args()
  mesh = distributed.create_mesh(jax.devices()[:1])
  model = codec.build_model(dict(num_classes=150, depth=50, dropout_rate=0.0))
  config = SimpleNamespace(base_lr=0.01, momentum=0.9, weight_decay=1e-4, power=0.9,
                           head_lr_mult=10.0, warmup_steps=0, min_lr=0.0)  # fmt: skip
  tx, schedule = optim.create_optimizer(config, 1000)
  shape = (args.batch, args.crop, args.crop, 3)
  state, shardings = train_state.create_train_state(model, tx, jax.random.key(0), shape, mesh)
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.standard_normal(shape, np.float32),
    'label': rng.integers(0, 150, shape[:3]).astype(np.int32),
  }
  initial = jax.device_get(state)
  steps, updates = {}, {}
  for name in args.variants:
    cpu_conv_grad.CPU_DOT_WEIGHT_GRAD_KERNELS = VARIANTS[name]
    step = train_step.make_train_step(model, tx, schedule)
    start = time.perf_counter()
    compiled = train_step.compile_train_step(step, shardings, mesh).lower(
      state, batch, jax.random.key(1)).compile()  # fmt: skip
    print(f'{name}: compiled in {time.perf_counter() - start:.0f} s', flush=True)
    new, _ = compiled(jax.device_put(initial, shardings), batch, jax.random.key(1))
    updates[name] = jax.tree.map(lambda a, b: np.asarray(a) - b, new.params, initial.params)
    steps[name] = [compiled, new]
  times = {name: [] for name in steps}
  for _ in range(args.reps):
    for name, pair in steps.items():
      begin = time.perf_counter()
      pair[1], out = pair[0](pair[1], batch, jax.random.key(1))
      jax.block_until_ready(out)
      times[name].append(time.perf_counter() - begin)
  ref = jax.tree.leaves(updates[args.variants[0]])
  for name in steps:
    diffs = [np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
             for a, b in zip(jax.tree.leaves(updates[name]), ref, strict=True)]  # fmt: skip
    print(f'| {name} | {np.median(times[name]):.2f} s | {max(diffs):.1e} |'
          f' {" ".join(f"{t:.2f}" for t in times[name])} |')  # fmt: skip


if __name__ == '__main__':
  main()
