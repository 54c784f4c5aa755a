"""JAX PSPNet vs the PyTorch PSPNet, same weights and inputs, side by side: table and chart.

  .venv/bin/python benchmarks/vs_pytorch.py            # PSPNet-50, ~10 min on 2 idle cores
  .venv/bin/python benchmarks/vs_pytorch.py --quick    # tiny widths and sizes, < 1 min

Each case runs in two fresh processes, one per framework (benchmarks/vs_pytorch_worker.py),
pinned to the same cores with the same thread count. Each builds the model from one set of
weights (a TorchPSPNet with calibrated BatchNorm statistics, converted with psp_jax.convert),
runs once (JAX compiles first, timed apart), and then the driver alternates them: each
repetition runs `iters` steps in one process, then in the other (order swapped every
repetition), so a change of machine load hits both. Times are medians over repetitions.
Training is the project's real jitted step (SGD momentum 0.9, wd 1e-4, poly lr, 10x head
lr, aux loss 0.4) against torch.optim.SGD with the same groups; dropout is off in both so
the two first updates can be compared. Agreement: relative L2 of the eval logits, or of the
first step's parameter update (all parameters). On a TPU only the JAX side runs.
Outputs in --out_dir: vs_pytorch.json, vs_pytorch.md and vs_pytorch.png.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, 'vs_pytorch_worker.py')
# name: (kind, batch, side); quick mode replaces the side by QUICK_SIDE[side].
CASES = {
  'eval b1 473': ('eval', 1, 473),
  'eval b1 713': ('eval', 1, 713),
  'eval b8 233': ('eval', 8, 233),
  'train b2 473': ('train', 2, 473),
  'train b8 233': ('train', 8, 233),
}
QUICK_SIDE = {473: 57, 713: 73, 233: 41}
QUICK_CASES = ('eval b1 473', 'train b2 473')
FULL_MODEL = dict(num_classes=150, depth=50)
QUICK_MODEL = dict(num_classes=7, depth=18, width=4, head_channels=8, aux_channels=8)


def make_weights(model: dict, directory: str, seed: int = 0) -> tuple[str | None, str | None]:
  """Random TorchPSPNet weights with calibrated BatchNorm statistics, saved for both sides.

  Returns:
    (torch state_dict path, flattened Flax variables .npz path), or (None, None) without
    PyTorch (the JAX side then initialises its own).
  """
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    return None, None
  from psp_jax.interop import semseg  # noqa: PLC0415
  from psp_jax.interop.torch_pspnet import TorchPSPNet  # noqa: PLC0415

  torch.manual_seed(seed)
  net = TorchPSPNet(**model)
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in bns:  # running statistics of real activations, not the identity
      m.momentum = 1.0
    net.train()(torch.randn(2, 3, 97, 97))
    for m in bns:
      m.momentum = 0.1
  torch_path = os.path.join(directory, 'weights.pt')
  torch.save(net.state_dict(), torch_path)
  variables, _ = semseg.from_torch_state_dict(net.state_dict(), model)
  flat = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, f'{prefix}{k}/')
      else:
        flat[prefix + k] = v

  walk(variables, '')
  flax_path = os.path.join(directory, 'weights_flax.npz')
  np.savez(flax_path, **flat)
  return torch_path, flax_path


class Worker:
  """One worker process and its command pipe."""

  def __init__(self, framework: str, spec: dict, log_path: str):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', XLA_PYTHON_CLIENT_PREALLOCATE='false')
    env['PYTHONPATH'] = os.pathsep.join([os.path.dirname(HERE), env.get('PYTHONPATH', '')])
    self.framework, self.log = framework, open(log_path, 'w')  # noqa: SIM115
    self.proc = subprocess.Popen(
      [sys.executable, WORKER, framework, json.dumps(spec)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=self.log,
      text=True,
      env=env,
    )

  def receive(self) -> dict:
    for line in self.proc.stdout:
      if line.startswith('@@'):
        return json.loads(line[2:])
    self.proc.wait()
    raise RuntimeError(
      f'{self.framework} worker died (exit {self.proc.returncode}); see {self.log.name}'
    )

  def ask(self, **command) -> dict:
    self.proc.stdin.write(json.dumps(command) + '\n')
    self.proc.stdin.flush()
    return self.receive()

  def close(self) -> None:
    if self.proc.poll() is None:
      with contextlib.suppress(RuntimeError, BrokenPipeError):
        self.ask(cmd='exit')
      self.proc.wait(timeout=60)
    self.log.close()


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def agreement(prefix: str, kind: str) -> dict:
  """Relative L2 of the JAX outputs of the first run against the PyTorch ones."""
  with np.load(prefix + '_jax.npz') as j, np.load(prefix + '_torch.npz') as t:
    if kind == 'eval':
      return dict(rel_err=relative_error(j['logits'], t['logits']))
    keys = sorted(k for k in t.files if k != 'loss')
    update = relative_error(
      np.concatenate([j[k].ravel() for k in keys]), np.concatenate([t[k].ravel() for k in keys])
    )
    per_tensor = float(np.median([relative_error(j[k], t[k]) for k in keys]))
    return dict(
      rel_err=update,
      median_tensor_rel_err=per_tensor,
      loss_rel_err=relative_error(j['loss'], t['loss']),
    )


def run_case(name: str, args, model: dict, weights: tuple, directory: str) -> dict:
  """Both workers of one case, alternated; returns the case's row."""
  kind, batch, side = CASES[name]
  side = QUICK_SIDE[side] if args.quick else side
  rng = np.random.default_rng(side * 10 + batch)
  inputs = os.path.join(directory, 'inputs.npz')
  labels = rng.integers(0, model['num_classes'], (batch, side, side)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.2] = 255
  np.savez(inputs, images=rng.standard_normal((batch, side, side, 3), np.float32), labels=labels)
  tag = name.replace(' ', '_')
  spec = dict(
    kind=kind,
    model=model,
    inputs=inputs,
    torch_weights=weights[0],
    flax_weights=weights[1],
    threads=args.threads,
    cores=args.cores,
    dtype=args.dtype,
    xla_flags=args.xla_flags,
    out_prefix=os.path.join(directory, tag),
  )
  row = dict(case=name, kind=kind, batch=batch, side=side)
  logs = os.path.join(args.out_dir, 'logs')
  os.makedirs(logs, exist_ok=True)
  workers = {}
  try:
    workers['jax'] = Worker('jax', spec, os.path.join(logs, f'{tag}_jax.log'))
    row['jax'] = workers['jax'].receive()
    if weights[0] is not None and row['jax']['platform'] != 'tpu' and not args.jax_only:
      workers['torch'] = Worker('torch', spec, os.path.join(logs, f'{tag}_torch.log'))
      row['torch'] = workers['torch'].receive()
    times = {k: [] for k in workers}
    for rep in range(args.reps):
      order = sorted(workers, reverse=rep % 2 == 1)
      for k in order:
        seconds = workers[k].ask(cmd='run', iters=args.iters)['seconds']
        times[k].append(float(np.mean(seconds)))
    for k, worker in workers.items():
      row[k].update(worker.ask(cmd='stats'), rep_seconds=times[k])
      row[k]['median_s'] = float(np.median(times[k]))
      row[k]['images_per_s'] = batch / row[k]['median_s']
  finally:
    for worker in workers.values():
      worker.close()
  if 'torch' in workers:
    row.update(agreement(spec['out_prefix'], kind))
    row['ratio'] = row['jax']['median_s'] / row['torch']['median_s']
  return row


def environment(args) -> dict:
  """Machine, device and library versions for the report header."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  versions = {}
  for package in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'numpy'):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = None
  mem = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') if hasattr(os, 'sysconf') else 0
  return dict(
    date=datetime.datetime.now().astimezone().isoformat(timespec='minutes'),
    cpu=cpu,
    cpu_count=os.cpu_count(),
    cores=args.cores,
    threads=args.threads,
    memory_gib=round(mem / 2**30, 1),
    python=platform.python_version(),
    versions=versions,
    reps=args.reps,
    iters=args.iters,
    quick=args.quick,
    load_average=os.getloadavg()[0],
  )


def _gb(worker: dict, key: str) -> str:
  value = worker.get('device_peak_bytes') or worker.get(key)
  return '-' if value is None else f'{value / 1e9:.2f}'


def markdown(env: dict, rows: list[dict]) -> str:
  """The report: environment lines and one table row per case."""
  jax0 = rows[0]['jax']
  torch0 = next((r['torch'] for r in rows if 'torch' in r), {})
  versions = ', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)
  lines = [
    f'{"PSPNet-18, width 4 (--quick)" if env["quick"] else "PSPNet-50"}, JAX vs PyTorch, '
    f'{env["date"]}',
    '',
    f'- Machine: {env["cpu"]}, {env["cpu_count"]} CPUs, {env["memory_gib"]} GiB; both sides '
    f'pinned to cores {env["cores"]}; torch threads {torch0.get("threads", "-")}, XLA CPU pool '
    f'{jax0.get("threads")} cores. Load average at the start {env["load_average"]:.1f}.',
    f'- Devices: JAX {jax0["platform"]} ({jax0["device"]}), PyTorch '
    f'{torch0.get("device", "not run")}. XLA_FLAGS=`{jax0.get("xla_flags") or ""}`.',
    f'- Python {env["python"]}, {versions}.',
    f'- Medians of {env["reps"]} alternating repetitions of {env["iters"]} runs each, after one '
    "untimed run (JAX: after compiling). Rel. error: eval logits; train: the first step's "
    'update of all parameters together (and the median over tensors, and the loss). '
    'Peak memory: resident set during the timed runs '
    '(device memory on GPU/TPU); in brackets the peak over the whole process, set-up and '
    'compilation included.',
    '',
    '| case | PyTorch s | JAX s | JAX / PyTorch | img/s PyTorch | img/s JAX | JAX compile s '
    '| peak GB PyTorch | peak GB JAX | rel. error | GFLOP analytic / XLA | GFLOP/s PyTorch '
    '| GFLOP/s JAX |',
    '|' + '---|' * 13,
  ]
  for r in rows:
    j, t = r['jax'], r.get('torch', {})
    flops = j['flops_analytic'] / r['batch']
    gflop = f'{j["flops_analytic"] / 1e9:.4g} / '
    gflop += '-' if j.get('flops_xla') is None else f'{j["flops_xla"] / 1e9:.4g}'

    def rate(w, flops=flops, r=r):
      return '-' if not w else f'{flops * r["batch"] / w["median_s"] / 1e9:.3g}'

    err = '-' if 'rel_err' not in r else f'{r["rel_err"]:.1e}'
    if 'loss_rel_err' in r:
      err += f' (median tensor {r["median_tensor_rel_err"]:.0e}, loss {r["loss_rel_err"]:.0e})'
    peak_t = f'{_gb(t, "run_rss_peak_bytes")} ({_gb(t, "rss_peak_bytes")})' if t else '-'
    peak_j = f'{_gb(j, "run_rss_peak_bytes")} ({_gb(j, "rss_peak_bytes")})'
    cells = [
      f'{r["case"].replace(str(CASES[r["case"]][2]), str(r["side"]))}',
      f'{t["median_s"]:.3f}' if t else '-',
      f'{j["median_s"]:.3f}',
      f'**{r["ratio"]:.2f}**' if 'ratio' in r else '-',
      f'{t["images_per_s"]:.2f}' if t else '-',
      f'{j["images_per_s"]:.2f}',
      f'{j["compile_s"]:.1f}',
      peak_t,
      peak_j,
      err,
      gflop,
      rate(t),
      rate(j),
    ]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def chart(env: dict, rows: list[dict], path: str) -> None:
  """Images/s of both sides per case, and the JAX / PyTorch time ratio."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  names = [r['case'] for r in rows]
  x = np.arange(len(rows))
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={'width_ratios': [3, 2]})
  for offset, key, label in ((-0.2, 'torch', 'PyTorch'), (0.2, 'jax', 'JAX')):
    values = [r[key]['images_per_s'] if key in r else 0.0 for r in rows]
    left.bar(x + offset, values, 0.4, label=label)
  left.set_xticks(x, names, rotation=20)
  left.set_ylabel('images / s (higher is better)')
  left.legend()
  ratios = [r.get('ratio', 0.0) for r in rows]
  right.bar(x, ratios, 0.6, color=['tab:green' if v <= 1.0 else 'tab:orange' for v in ratios])
  right.axhline(1.0, color='k', lw=0.8)
  right.set_xticks(x, names, rotation=20)
  right.set_ylabel('JAX time / PyTorch time (lower is better)')
  for i, v in enumerate(ratios):
    right.text(i, v, f'{v:.2f}', ha='center', va='bottom')
  device = rows[0]['jax']['device']
  model = 'PSPNet-18 width 4 (--quick)' if env['quick'] else 'PSPNet-50'
  fig.suptitle(f'{model} on {env["cpu"] if device == "cpu" else device}, {env["date"][:10]}')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='tiny model and sizes (smoke test)')
  parser.add_argument('--cases', nargs='+', choices=list(CASES), help='subset of cases')
  parser.add_argument('--reps', type=int, help='alternating repetitions (default 5; quick 2)')
  parser.add_argument('--iters', type=int, default=1, help='runs per repetition')
  parser.add_argument('--threads', type=int, help='torch threads (default: the cores used)')
  parser.add_argument('--dtype', default='float32', help='JAX compute dtype')
  parser.add_argument('--xla_flags', help="XLA_FLAGS of the JAX side (default: the project's)")
  parser.add_argument('--jax_only', action='store_true', help='skip PyTorch')
  parser.add_argument('--out_dir', default=os.path.join(HERE, 'results'))
  parser.add_argument('--chart', help='PNG path (default OUT_DIR/vs_pytorch.png)')
  args = parser.parse_args(argv)
  args.reps = args.reps or (2 if args.quick else 5)
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []
  args.cores = cores[: args.threads] if args.threads else cores
  args.threads = args.threads or len(cores) or os.cpu_count()
  names = args.cases or (list(QUICK_CASES) if args.quick else list(CASES))
  model = QUICK_MODEL if args.quick else FULL_MODEL
  os.makedirs(args.out_dir, exist_ok=True)
  env = environment(args)
  rows = []
  with tempfile.TemporaryDirectory() as directory:
    weights = make_weights(model, directory)
    for name in names:
      print(f'{name} ...', file=sys.stderr, flush=True)
      rows.append(run_case(name, args, model, weights, directory))
  env['load_average_end'] = os.getloadavg()[0]
  report = markdown(env, rows)
  with open(os.path.join(args.out_dir, 'vs_pytorch.json'), 'w') as f:
    json.dump(dict(environment=env, rows=rows), f, indent=1)
  with open(os.path.join(args.out_dir, 'vs_pytorch.md'), 'w') as f:
    f.write(report)
  chart(env, rows, args.chart or os.path.join(args.out_dir, 'vs_pytorch.png'))
  sys.stdout.write(report)


if __name__ == '__main__':
  main()
