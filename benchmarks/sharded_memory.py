"""Per-device memory and collectives of the sharded train step, from XLA's compiled program.

  .venv/bin/python benchmarks/sharded_memory.py [--devices 8] [--batch 16] [--crop 473]

The project's real train step (PSPNet-50, SGD recipe, SyncBN, loss over 8 groups as the
paper's 8 GPUs) is lowered and compiled for a 1-D data mesh from abstract inputs, so
nothing is allocated: on a machine without 8 accelerators the devices are simulated CPU
devices (--xla_force_host_platform_device_count). Reported: compiled.memory_analysis() (per
device: arguments, outputs, aliased donations, temporaries, code) and every collective in
the optimised HLO with its count and bytes. Run on a TPU host to get the TPU's own numbers;
the CPU figures are XLA's CPU buffer assignment (no TPU layout padding or fusions).
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--batch', type=int, default=16, help='global batch')
  parser.add_argument('--crop', type=int, default=473)
  parser.add_argument('--depth', type=int, default=50)
  parser.add_argument('--dtype', default='float32', help='compute dtype (bfloat16 for TPU)')
  parser.add_argument('--loss_groups', type=int, default=8)
  parser.add_argument('--out', default=os.path.join(HERE, 'results', 'sharded_memory.json'))
  args = parser.parse_args()

  sys.path.insert(0, os.path.dirname(HERE))
  from psp_jax import distributed  # noqa: PLC0415 (after sys.path is set)
  from psp_jax.models import codec  # noqa: PLC0415 (after sys.path is set)

  if distributed.cpu_only() and 'XLA_FLAGS' not in os.environ:
    os.environ['XLA_FLAGS'] = (
      f'{distributed.CPU_XLA_FLAGS} --xla_force_host_platform_device_count={args.devices}'
    )
  import jax  # noqa: PLC0415 (after XLA_FLAGS is set)
  import jax.numpy as jnp  # noqa: PLC0415 (after XLA_FLAGS is set)
  import ml_collections  # noqa: PLC0415 (after XLA_FLAGS is set)

  from psp_jax.train import hbm, optim, train_state, train_step  # noqa: PLC0415 (as jax)

  devices = jax.devices()[: args.devices]
  if len(devices) < args.devices:
    raise SystemExit(f'{args.devices} devices wanted, {len(devices)} found.')
  mesh = distributed.create_mesh(devices)
  model = codec.build_model(dict(num_classes=150, depth=args.depth, dtype=args.dtype))
  config = ml_collections.ConfigDict(
    dict(base_lr=0.01, momentum=0.9, weight_decay=1e-4, power=0.9, head_lr_mult=10.0)
  )
  config.warmup_steps, config.min_lr = 0, 0.0
  tx, schedule = optim.create_optimizer(config, 100_000)
  step = train_step.make_train_step(model, tx, schedule, loss_groups=args.loss_groups, mesh=mesh)
  key = jax.random.key(0)
  state = train_state.abstract_state(model, tx, key, (1, args.crop, args.crop, 3), mesh)
  shardings = jax.tree.map(lambda x: x.sharding, state)
  data = distributed.batch_sharded(mesh)
  hw = (args.batch, args.crop, args.crop)
  batch = {
    'image': jax.ShapeDtypeStruct((*hw, 3), jnp.float32, sharding=data),
    'label': jax.ShapeDtypeStruct(hw, jnp.int32, sharding=data),
  }
  start = time.perf_counter()
  compiled = train_step.compile_train_step(step, shardings, mesh).lower(state, batch, key).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  fields = ('argument', 'output', 'alias', 'temp', 'generated_code')
  memory = {f: int(getattr(mem, f'{f}_size_in_bytes', 0) or 0) for f in fields}
  # Live at the peak: arguments + outputs + temporaries, minus the donated (aliased) state.
  memory['total'] = memory['argument'] + memory['output'] + memory['temp'] - memory['alias']
  coll = hbm.collectives(compiled.as_text())
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  result = dict(
    devices=len(devices),
    platform=devices[0].platform,
    device_kind=devices[0].device_kind,
    batch=args.batch,
    per_device_batch=args.batch // len(devices),
    crop=args.crop,
    depth=args.depth,
    dtype=args.dtype,
    loss_groups=args.loss_groups,
    parameters=int(n_params),
    compile_s=compile_s,
    memory_bytes=memory,
    collectives=coll,
    xla_flags=os.environ.get('XLA_FLAGS', ''),
  )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1)
  gb = 1e9
  print(
    f'PSPNet-{args.depth} train step, global batch {args.batch} on {len(devices)} '
    f'{devices[0].platform} devices ({args.batch // len(devices)} per device), crop '
    f'{args.crop}, {args.dtype}, {n_params / 1e6:.1f} M parameters; compiled in {compile_s:.0f} s'
  )
  print('\n| per device | GB |\n|---|---|')
  for f in (*fields, 'total'):
    print(f'| {f} | {memory[f] / gb:.3f} |')
  print('\n| collective | count | MB per step |\n|---|---|---|')
  for kind, c in sorted(coll.items()):
    print(f'| {kind} | {c["count"]} | {c["bytes"] / 1e6:.1f} |')


if __name__ == '__main__':
  main()
