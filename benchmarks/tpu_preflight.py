"""TPU pre-flight of the recipes users run: one `psp_jax.preflight` per row, a Markdown table.

  .venv/bin/python benchmarks/tpu_preflight.py [--rows NAME,...] [--max_rows N] [--redo]

Each row (a config, depth, dtype and TPU topology) runs `.venv-tpu/bin/python -m
psp_jax.preflight ... --json` in its own process (a full-size compile takes 5-20 minutes
and 2-3 GB of RAM on a small machine) and keeps its JSON under
benchmarks/results/logs/tpu_preflight/; a rerun skips rows already there (--redo: not).
After every row the table is rewritten to benchmarks/results/tpu_preflight_<date>.md with
every row of ROWS: compiled, does not fit, failed (with its error) or not run; the notes
below its marker line are kept.
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOGS = ROOT / 'benchmarks' / 'results' / 'logs' / 'tpu_preflight'
TPU_PYTHON = ROOT / '.venv-tpu' / 'bin' / 'python'
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Row:
  """One pre-flight: a config with depth and compute dtype, on a topology."""

  config: str
  depth: int
  dtype: str
  topology: str
  eval: bool = False  # Also compile the evaluation's window step (a few more minutes).
  extra: tuple[str, ...] = ()
  label: str = ''  # Tells apart rows of the same config and slice (their JSON file names).

  @property
  def name(self) -> str:
    name = f'{self.config}-{self.depth}-{self.dtype}-{self.topology.replace(":", "_")}'
    return f'{name}-{self.label}' if self.label else name

  def argv(self, json_path: pathlib.Path) -> list[str]:
    """The psp_jax.preflight command line of this row."""
    argv = [str(TPU_PYTHON), '-m', 'psp_jax.preflight', f'--config=configs/{self.config}.py']
    argv += [f'--topology={self.topology}', f'--config.model.depth={self.depth}']
    argv += [f'--config.model.dtype={self.dtype}', f'--json={json_path}', *self.extra]
    return argv + ([] if self.eval else ['--noeval'])


# In the order they are run: the rows that matter most first.
ROWS = (
  Row('ade20k', 50, 'bfloat16', 'v5e:2x4', eval=True),
  Row('ade20k', 50, 'float32', 'v5e:2x4'),
  Row('ade20k', 50, 'bfloat16', 'v6e:2x4'),
  Row('ade20k', 50, 'bfloat16', 'v5p:2x2x1'),
  Row('ade20k', 50, 'bfloat16', 'v4:2x2x1'),
  Row('ade20k', 101, 'bfloat16', 'v5e:2x4'),
  Row('cityscapes', 50, 'bfloat16', 'v5e:2x4', eval=True),
  Row('voc2012', 50, 'bfloat16', 'v5e:2x4'),
  # 16 chips over 4 hosts; beyond 8 chips every chip evaluates one image (as tpu_launch sets).
  Row('ade20k', 50, 'bfloat16', 'v5e:4x4', extra=('--config.eval.batch_size=16',)),
  Row('cityscapes', 50, 'float32', 'v5e:2x4'),
  Row('ade20k', 101, 'float32', 'v5e:2x4'),
  Row('ade20k', 50, 'float32', 'v4:2x2x1'),
  Row('ade20k', 101, 'bfloat16', 'v4:2x2x1'),
  Row('ade20k', 101, 'bfloat16', 'v5p:2x2x1'),
  Row('cityscapes', 101, 'bfloat16', 'v5e:2x4'),
  Row('voc2012', 101, 'bfloat16', 'v5e:2x4'),
  Row('voc2012', 50, 'float32', 'v5e:2x4'),
  Row('ade20k', 101, 'bfloat16', 'v6e:2x4'),
  # TPU7x's smallest slice: 4 chips, 8 JAX devices (two a chip), 2 images a device.
  Row('ade20k', 50, 'bfloat16', 'tpu7x:2x2x1'),
  # Colab's TPU runtime: one v5e chip with all 16 images of the recipe's batch.
  Row('ade20k', 50, 'bfloat16', 'v5e:1x1'),
)


def error_of(log: str, returncode: int) -> str:
  """One line for a row that wrote no JSON: the crash, the error line, or the last line."""
  lines = log.strip().splitlines() or ['no output']
  errors = [ln for ln in lines if ln.startswith(('error:', 'Fatal Python error:'))]
  if returncode < 0:  # A signal: libtpu died inside the compile.
    return f'crashed in the compile (signal {-returncode}; {(errors or lines)[-1]})'
  return f'exit {returncode}: {(errors or lines)[-1]}'


def run_row(row: Row) -> dict:
  """Runs one pre-flight; its JSON, or {'error': ...} when it failed before writing one."""
  path = LOGS / f'{row.name}.json'
  path.unlink(missing_ok=True)
  started = time.perf_counter()
  with open(LOGS / f'{row.name}.log', 'w') as log:
    proc = subprocess.run(row.argv(path), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  wall = time.perf_counter() - started
  if path.exists():
    result = json.loads(path.read_text())
  else:
    result = {'error': error_of((LOGS / f'{row.name}.log').read_text(), proc.returncode)}
  result.update(wall_s=wall, returncode=proc.returncode)
  result.setdefault('date', datetime.date.today().isoformat())
  path.write_text(json.dumps(result, indent=1))
  return result


def load(row: Row) -> dict | None:
  """A row's stored result (the date from the file when the JSON has none), or None."""
  path = LOGS / f'{row.name}.json'
  if not path.exists():
    return None
  result = json.loads(path.read_text())
  mtime = datetime.date.fromtimestamp(path.stat().st_mtime).isoformat()
  result.setdefault('date', mtime)
  return result


def _cells(row: Row, result: dict | None) -> list[str]:
  """The table cells of one row."""
  topology = f'`{row.topology}`'
  head = [f'PSPNet-{row.depth}', row.config, row.dtype]
  if result is None:
    return [*head, topology, *['-'] * 13, 'not run: time']
  if 'error' in result:
    return [*head, topology, *['-'] * 13, f'failed: {result["error"]}']
  chips, hosts = result['chips'], result['hosts']
  topology += f' ({chips} chip{"s" * (chips > 1)}, {hosts} host{"s" * (hosts > 1)})'
  train = result.get('train')
  evaluation = result.get('eval')
  compile_s = [f'{r["compile_s"]:.0f}' for r in (train, evaluation) if r]
  when = f'{" + ".join(compile_s) or "-"} s, {result["date"]}'
  if train is None:
    return [*head, topology, 'no', *['-'] * 12, f'{when}: {result["message"]}']
  mem, coll = train['memory'], train['collectives']
  reduce = coll.get('all-reduce', {'count': 0, 'bytes': 0})
  others = sorted(k for k in coll if k != 'all-reduce')
  eval_cell = '-'
  if evaluation:
    eval_cell = f'{evaluation["memory"]["total"] / GiB:.2f}'
  return [
    *head,
    topology,
    'yes' if result['fits'] else 'no (eval)',
    f'{mem["argument"] / GiB:.2f}',
    f'{mem["temp"] / GiB:.2f}',
    f'{mem["total"] / GiB:.2f} / {train["hbm_bytes"] / GiB:.0f}',
    f'{train["flops"] / 1e12:.2f}',
    f'{train["xla_bytes_accessed"] / 1e9:.1f}',
    f'{train["hbm_traffic"] / 1e9:.1f}',
    f'{reduce["count"]} x, {reduce["bytes"] / 1e6:.0f} MB' + (f' (+{others})' if others else ''),
    f'{train["compute_s"] * 1e3:.1f}',
    f'{train["step_s"] * 1e3:.1f} ({train["bound"]})',
    f'{train["images_per_s"]:.0f}',
    f'>= {train["run_lower_bound_s"] / 3600:.2f}, ~{train["run_s"] / 3600:.2f} '
    f'({result["steps"]:,} steps)',
    eval_cell,
    when,
  ]


HEADER = (
  'model',
  'data',
  'dtype',
  'topology',
  'fits',
  'args GiB',
  'temp GiB',
  'live / HBM GiB',
  'TFLOP / step',
  'XLA GB accessed (cost model)',
  'HBM GB (our estimate)',
  'all-reduce / step',
  'FLOP ms (lower bound)',
  'roofline ms (estimate)',
  'images/s (estimate)',
  'recipe h (bound, estimate)',
  'eval live GiB',
  'compile (train + eval), date',
)


NOTES_MARKER = '\n<!-- Notes: kept when benchmarks/tpu_preflight.py rewrites the table above. -->\n'


def write_table(results: dict[Row, dict | None], out: pathlib.Path) -> None:
  """The Markdown page: what was measured, the chip figures, the table."""
  versions = next((r['versions'] for r in results.values() if r and 'versions' in r), {})
  from psp_jax.train import tpu_chips  # noqa: PLC0415 (after sys.path is set)

  chips = [
    f'| {k} | {c.peak_flops / 1e12:.0f} | {c.hbm_bytes / GiB:.0f} | {c.hbm_bytes_per_s / 1e9:.0f} '
    f'| {c.source} |'
    for k, c in tpu_chips.CHIPS.items()
  ]
  compiled = sum(1 for r in results.values() if r and 'train' in r)
  lines = [
    '# TPU pre-flight of the official recipes (compiled for TPU on a CPU-only machine)',
    '',
    f'Written by `benchmarks/tpu_preflight.py`: `psp_jax.preflight` per row, jax '
    f'{versions.get("jax", "?")}, jaxlib {versions.get("jaxlib", "?")}, libtpu '
    f'{versions.get("libtpu", "?")}; {compiled} of {len(results)} rows compiled. Figures are '
    "per chip (on TPU7x per JAX device, half a chip), from XLA's `memory_analysis()` and "
    '`cost_analysis()` of the program libtpu '
    "compiles for the slice; the global batch is the recipe's 16, split over the chips. "
    '"live" = arguments + outputs - aliased (the donated state) + temporaries + code. XLA\'s '
    '"bytes accessed" counts a TPU matmul or convolution several times over and is shown, not '
    'used; HBM traffic is our estimate from the optimised HLO (psp_jax/train/hbm.py). FLOPs at '
    "the bf16 peak are a lower bound on the step (float32 uses the bf16 peak too, as JAX's "
    'default matmul precision does on TPU); the roofline, max(FLOPs / peak, estimated bytes / '
    'HBM bandwidth), is an estimate. Recipe hours: steps x the FLOP bound, and steps x the '
    'roofline. Compile time is on 2 '
    'shared CPU cores.',
    '',
    '| chip | bf16 TFLOP/s | HBM GiB | HBM GB/s | source |',
    '|---|---|---|---|---|',
    *chips,
    '',
    '| ' + ' | '.join(HEADER) + ' |',
    '|' + '---|' * len(HEADER),
    *('| ' + ' | '.join(_cells(row, r)) + ' |' for row, r in results.items()),
    '',
  ]
  # Hand-written notes below the marker survive a rewrite of the table.
  notes = out.read_text().partition(NOTES_MARKER)[2] if out.exists() else ''
  out.write_text('\n'.join(lines) + NOTES_MARKER + (notes or '\n'))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rows', help='comma-separated row names (default: all, in order)')
  parser.add_argument('--max_rows', type=int, default=None, help='run at most this many')
  parser.add_argument('--redo', action='store_true', help='recompile rows already stored')
  parser.add_argument('--date', default=datetime.date.today().isoformat(), help='file date')
  args = parser.parse_args()
  sys.path.insert(0, str(ROOT))
  if not TPU_PYTHON.exists():
    raise SystemExit(f'{TPU_PYTHON} is missing: run `make preflight-setup` first.')
  LOGS.mkdir(parents=True, exist_ok=True)
  out = ROOT / 'benchmarks' / 'results' / f'tpu_preflight_{args.date}.md'
  wanted = set(args.rows.split(',')) if args.rows else None
  results = {row: load(row) for row in ROWS}
  ran = 0
  for row in ROWS:
    if (wanted and row.name not in wanted) or (results[row] and not args.redo):
      continue
    if args.max_rows is not None and ran >= args.max_rows:
      break
    print(f'{row.name} ...', flush=True)
    results[row] = run_row(row)
    ran += 1
    status = 'error' if 'error' in results[row] else f'fits={results[row]["fits"]}'
    print(f'  {status}, {results[row]["wall_s"]:.0f} s', flush=True)
    write_table(results, out)
  write_table(results, out)
  print(f'wrote {os.path.relpath(out, ROOT)}')


if __name__ == '__main__':
  main()
