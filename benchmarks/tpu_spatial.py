"""How the recipe's step scales from 8 to 64 v5e chips, images split over 'space' past 16.

  .venv/bin/python benchmarks/tpu_spatial.py [--redo]

PSPNet-50 at the ADE20K recipe (bfloat16, global batch 16) on v5e:2x4 and v5e:4x4 (data
parallel: 2 and 1 images a chip), v5e:4x8 (16 x 2: each image's height over 2 chips) and
v5e:8x8 (16 x 4), and Cityscapes at whole 1024x2048 images (configs/cityscapes_whole.py)
on v5e:4x8, each compiled by
`psp_jax.preflight` as benchmarks/tpu_preflight.py runs it (JSON kept under
benchmarks/results/logs/tpu_preflight/). Prints a Markdown table per chip: memory, FLOPs
(XLA's cost model) and their time at the bf16 peak (a lower bound), our HBM estimate and its
time, the collectives (halo exchanges are the collective-permutes) and our interconnect
estimate (psp_jax/train/hbm.py interconnect_bytes at 400 GB/s, every link busy), the
roofline estimate (the largest of the three), its speed-up over 8 chips, and the recipe's
hours and dollars.
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tpu_preflight  # noqa: E402
from tpu_preflight import GiB, Row  # noqa: E402

SPACE2 = ('--config.spatial_partitions=2', '--config.eval.batch_size=32')
SPACE4 = ('--config.spatial_partitions=4', '--config.eval.batch_size=64')
ROWS = (
  Row('ade20k', 50, 'bfloat16', 'v5e:2x4', label='scaling'),
  Row('ade20k', 50, 'bfloat16', 'v5e:4x4', extra=('--config.eval.batch_size=16',), label='scaling'),
  Row('ade20k', 50, 'bfloat16', 'v5e:4x8', extra=SPACE2),
  Row('ade20k', 50, 'bfloat16', 'v5e:8x8', extra=SPACE4),
  Row('cityscapes_whole', 50, 'bfloat16', 'v5e:4x8', extra=SPACE2),  # 1024x2048 crops
)
HEADER = (
  'data, crop', 'slice (chips, hosts)', 'data x space', 'live / 16 GiB', 'TFLOP a chip',
  'FLOP ms (bound)', 'HBM GB, ms (estimate)', 'halo exchanges', 'all-reduce, all-gather MB',
  'ICI ms (estimate)', 'roofline ms', 'vs 8 chips', 'recipe h (bound, estimate)',
  '$ (bound, estimate)',
)  # fmt: skip


def cells(row: Row, result: dict | None) -> list[str]:
  """A row's cells, every figure as psp_jax.preflight's JSON gives it (its roofline, hours and
  bill included); the speed-up over 8 chips is filled in by main."""
  crop = '1024x2048' if row.config == 'cityscapes_whole' else '473x473'
  head = [f'{row.config.split("_")[0]}, {crop}', f'`{row.topology}`']
  if not result or 'train' not in result:
    why = (result or {}).get('error') or (result or {}).get('message') or 'not run'
    return [*head, *['-'] * (len(HEADER) - 3), why]
  train, chips = result['train'], result['chips']
  head[1] += f' ({chips}, {result["hosts"]})'
  space = next((int(a.split('=')[1]) for a in row.extra if 'spatial_partitions' in a), 1)
  coll = train['collectives']
  permute = coll.get('collective-permute', {'count': 0, 'bytes': 0})
  mb = lambda kind: coll.get(kind, {'bytes': 0})['bytes'] / 1e6  # noqa: E731
  return [
    *head,
    f'{chips // space} x {space}',
    f'{train["memory"]["total"] / GiB:.2f}',
    f'{train["flops"] / 1e12:.3f}',
    f'{train["compute_s"] * 1e3:.1f}',
    f'{train["hbm_traffic"] / 1e9:.2f}, {train["memory_s"] * 1e3:.1f}',
    f'{permute["count"]} x, {permute["bytes"] / 1e6:.1f} MB',
    f'{mb("all-reduce"):.0f}, {mb("all-gather"):.1f}',
    f'{train["ici_s"] * 1e3:.1f}',
    f'{train["step_s"] * 1e3:.1f} ({train["bound"]})',
    '{ratio}',
    f'{train["run_lower_bound_s"] / 3600:.2f}, {train["run_s"] / 3600:.2f}',
    f'{result["run_lower_bound_usd"]:.2f}, {result["run_usd"]:.2f}',
  ]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--redo', action='store_true', help='recompile rows already stored')
  args = parser.parse_args()
  sys.path.insert(0, str(tpu_preflight.ROOT))
  tpu_preflight.LOGS.mkdir(parents=True, exist_ok=True)
  results = {}
  for row in ROWS:
    results[row] = None if args.redo else tpu_preflight.load(row)
    if results[row] is None:
      print(f'{row.name} ...', file=sys.stderr, flush=True)
      results[row] = tpu_preflight.run_row(row)
  rows = [cells(row, results[row]) for row in ROWS]
  base = next((float(r[10].split()[0]) for r in rows if r[1].startswith('`v5e:2x4`')), None)
  print('| ' + ' | '.join(HEADER) + ' |')
  print('|' + '---|' * len(HEADER))
  for r in rows:
    if r[11] == '{ratio}':
      ms = float(r[10].split()[0])
      r[11] = f'{base / ms:.2f}x' if base and r[0].startswith('ade20k') else '-'
    print('| ' + ' | '.join(r) + ' |')


if __name__ == '__main__':
  main()
