"""The HBM estimate (psp_jax/train/hbm.py) against XLA's count on programs counted by hand.

Each program is compiled for TPU v5e with libtpu (compile-only, on any machine); its hand
count is the bytes of the tensors it must read and write, once, and of the convolutions and
dots, their FLOPs (our count beside XLA's). Run with .venv-tpu:

  .venv-tpu/bin/python benchmarks/hbm_check.py          # a table
  .venv-tpu/bin/python benchmarks/hbm_check.py --json   # one JSON line (tests/test_hbm.py)
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from psp_jax.train import aot, hbm  # noqa: E402

BF16 = jnp.bfloat16


def conv(dilation: int):
  def f(x, w):
    dims = ('NHWC', 'HWIO', 'NHWC')
    return jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', rhs_dilation=(dilation,) * 2, dimension_numbers=dims
    )

  return f


def gradient(f):
  """(dx, dw) of sum(f(x, w) * g): reads x, w and g, writes dx and dw."""
  return jax.grad(lambda x, w, g: jnp.sum((f(x, w) * g).astype(jnp.float32)), (0, 1))


def nbytes(*structs) -> int:
  return sum(int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize for s in structs)


def programs() -> list[dict]:
  """Every program: its function, abstract arguments, hand count and what that counts."""
  one = aot.topology_mesh('v5e:1x1').mesh
  chip = SingleDeviceSharding(one.devices.flat[0])

  def arg(shape, dtype=BF16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=chip)

  a, b, ab = arg((7200, 2304)), arg((2304, 256)), arg((7200, 256))
  x, w1, w3 = arg((2, 60, 60, 256)), arg((1, 1, 256, 256)), arg((3, 3, 256, 256))
  p = arg((4096, 4096), jnp.float32)
  eight = aot.topology_mesh('v5e:2x4').mesh
  shards = jax.ShapeDtypeStruct(
    (8 * 1024, 1024), jnp.float32, sharding=NamedSharding(eight, P('data'))
  )
  psum = jax.shard_map(
    lambda v: jax.lax.psum(v, 'data'), mesh=eight, in_specs=P('data'), out_specs=P('data')
  )
  shard = nbytes(jax.ShapeDtypeStruct((1024, 1024), jnp.float32))
  # FLOPs by hand: 2 per multiply-add of the window taps that meet the input, (output, tap)
  # pairs a dimension: 3 x 60 less 2 at the padding for 3x3 'SAME'; 60 + 2 x 56 at dilation
  # 4. The gradient (of a loss linear in the output): data and weight gradients, 2 x forward.
  mm, conv_ = 2 * 7200 * 2304 * 256, 2 * 2 * 256 * 256
  flops = {'matmul': mm, 'conv 1x1': conv_ * 60**2, 'conv 3x3': conv_ * 178**2}
  flops |= {'conv 3x3, dilation 4': conv_ * 172**2, 'matmul gradient': 2 * mm}
  flops |= {'conv 3x3 gradient': 2 * conv_ * 178**2}
  flops['conv 3x3, dilation 4, gradient'] = 2 * conv_ * 172**2
  rows = [
    ('matmul', 'dot', lambda a, b: a @ b, (a, b), nbytes(a, b, ab), 0),
    ('conv 1x1', 'dot', conv(1), (x, w1), nbytes(x, w1, x), 0),
    ('conv 3x3', 'dot', conv(1), (x, w3), nbytes(x, w3, x), 0),
    ('conv 3x3, dilation 4', 'dot', conv(4), (x, w3), nbytes(x, w3, x), 0),
    ('relu(2x + 1)', 'elementwise', lambda x: jax.nn.relu(2 * x + 1), (x,), nbytes(x, x), 0),
    ('matmul gradient', 'dot', gradient(lambda a, b: a @ b), (a, b, ab), nbytes(a, b, ab, a, b), 0),
    # XLA pads the cotangent for the data gradient and slices it for the weight gradient:
    # g is read twice, the second time as the extra.
    ('conv 3x3 gradient', 'dot', gradient(conv(1)), (x, w3, x), nbytes(x, w3, x, x, w3), nbytes(x)),
    (
      'conv 3x3, dilation 4, gradient',
      'dot',
      gradient(conv(4)),
      (x, w3, x),
      nbytes(x, w3, x, x, w3),
      nbytes(x),
    ),
    ('donated update', 'update', lambda p, g: p - 0.1 * g, (p, p), nbytes(p, p, p), 0),
    ('all-reduce', 'collective', psum, (shards,), 2 * shard, 0),
  ]
  out = []
  for name, kind, f, args, hand, extra in rows:
    jit = jax.jit(f, donate_argnums=0) if name == 'donated update' else jax.jit(f)
    grad = 'gradient' in name
    out.append(dict(program=name, kind=kind, grad=grad, jitted=jit, args=args, hand=hand))
    out[-1]['extra'], out[-1]['flops'] = extra, flops.get(name, 0)
  return out


def measure(row: dict) -> dict:
  compiled = row['jitted'].lower(*row['args']).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  estimate = hbm.traffic(compiled.as_text())
  return dict(
    program=row['program'],
    kind=row['kind'],
    grad=row['grad'],
    xla_bytes=float(cost['bytes accessed']),
    estimate_bytes=estimate.bytes,
    hand_bytes=row['hand'],
    hand_extra_bytes=row['extra'],
    xla_flops=float(cost.get('flops', 0.0)),
    our_flops=sum(estimate.part_flops.values()),
    hand_flops=row['flops'],
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--json', action='store_true', help='one JSON line instead of a table')
  rows = [measure(r) for r in programs()]
  if parser.parse_args().json:
    print(json.dumps(rows))
    return
  print(
    '| program (bf16, v5e) | XLA bytes accessed | our estimate | hand count '
    "| XLA's GFLOP | our count | by hand |"
  )
  print('|---|---:|---:|---:|---:|---:|---:|')
  for r in rows:
    hand = f'{r["hand_bytes"] / 1e6:.1f} MB'
    if r['hand_extra_bytes']:
      hand += f' (+{r["hand_extra_bytes"] / 1e6:.1f} MB re-read)'
    print(
      f'| {r["program"]} | {r["xla_bytes"] / 1e6:.1f} MB | {r["estimate_bytes"] / 1e6:.1f} MB '
      f'| {hand} | {r["xla_flops"] / 1e9:.2f} | {r["our_flops"] / 1e9:.2f} '
      f'| {r["hand_flops"] / 1e9:.2f} |'
    )


if __name__ == '__main__':
  main()
