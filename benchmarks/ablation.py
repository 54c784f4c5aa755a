"""Trains and evaluates every ablation variant x seed and writes docs/ablation.md and .png.

  .venv/bin/python benchmarks/ablation.py                      # Table 1 + alpha 0, 3 seeds
  .venv/bin/python benchmarks/ablation.py --variants all       # also alpha 0.3 / 0.6 / 0.9
  .venv/bin/python benchmarks/ablation.py --steps 200 --seeds 0,1 --variants baseline,b1-avg
  .venv/bin/python benchmarks/ablation.py --quick              # tiny smoke run, temp output

The defaults (8 variants x seeds 0, 1, 2, 200 steps) take about 30-45 min on two idle CPU
cores. The variants are configs/ablation.py's (the paper's Tables 1 and 2 on the synthetic
scenes). Each run trains from scratch for --steps steps and is then evaluated with
psp_jax.evaluate on the whole validation split (official protocol: mean over all 11
classes, whole image with the flip), giving mIoU, pixel accuracy (allAcc) and per-class IoU.
A run's numbers go to WORKDIR/s<steps>/<variant>/seed<k>/ablation_result.json: a rerun skips
the runs that have one and resumes an interrupted run from its checkpoint.

Runs execute one after another in this process: JAX and TensorFlow are imported once and
the synthetic data set is opened once; every variant is a different model and compiles
anyway, and the persistent compilation cache (--compilation_cache_dir) spares the second
and later seeds of a variant XLA's compilation. Ctrl-C checkpoints the current run and
stops; rerun the same command to continue.

The report keeps everything above RESULTS_MARKER of an existing --out_dir/ablation.md and
rewrites everything below it.
"""

import argparse
import datetime
import json
import logging
import os
import pathlib
import platform
import sys
import tempfile
import time

from psp_jax import runtime  # noqa: E402

runtime.quiet_tensorflow_env()  # Before anything below imports TensorFlow.

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

import ablation_report  # noqa: E402

from configs import ablation as ablation_config  # noqa: E402

RESULT_FILE = 'ablation_result.json'
DEFAULT_SEEDS = (0, 1, 2)
# --quick: a tiny network on tiny images, two variants x two seeds, a few steps. The two
# variants share the network (only the aux weight differs), so the model's initialisation
# and evaluation compile once: the test stays short.
QUICK = dict(
  variants=('baseline', 'baseline-aux0'),
  seeds=(0, 1),
  steps=3,
  model=dict(depth=18, width=4, head_channels=8, aux_channels=8),
  synthetic=dict(image_size=41, num_train=16, num_val=4),
  batch_size=4,
  crop_size=41,
)


def make_config(variant: str, seed: int, steps: int, *, quick: bool, data_dir: str | None):
  """configs/ablation.py's config of a variant with this run's seed and length.

  Args:
    variant: a key of configs/ablation.py VARIANTS.
    seed: config.seed (initialisation, dropout, data order and augmentation).
    steps: training steps; the run validates and checkpoints once, at the end.
    quick: shrink the network, the data and the batch to QUICK's.
    data_dir: config.data.data_dir (None: the TFDS default).

  Returns:
    The config.
  """
  config = ablation_config.get_config(variant)
  config.seed = seed
  config.num_train_steps = config.eval_every_steps = config.checkpoint_every_steps = steps
  config.data.data_dir = data_dir
  if quick:
    for key, value in QUICK['model'].items():
      config.model[key] = value
    for key, value in QUICK['synthetic'].items():
      config.data.synthetic[key] = value
    config.batch_size = QUICK['batch_size']
    config.data.crop_size = QUICK['crop_size']
    config.data.shuffle_buffer = QUICK['synthetic']['num_train']
    config.eval.base_size = QUICK['synthetic']['image_size']
    config.log_every_steps = 1
    config.num_summary_images = 0
  return config


def _fingerprint(config) -> dict:
  """What must match for a stored result to stand for this run (all but where data lives)."""
  out = json.loads(config.to_json_best_effort())
  out['data'].pop('data_dir', None)
  return out


def run_one(variant: str, seed: int, config, run_dir: pathlib.Path) -> tuple[dict, bool]:
  """Trains (or resumes) and evaluates one run, or reads its stored result.

  Args:
    variant: the variant's name, stored with the result.
    seed: the seed, stored with the result.
    config: make_config's config.
    run_dir: the run's training workdir; the result is written there.

  Returns:
    (result dict, whether it was read from an earlier run).

  Raises:
    RuntimeError: run_dir holds a result of another config.
    KeyboardInterrupt: a signal stopped training (its checkpoint is saved).
  """
  from psp_jax import experiment, weights  # noqa: PLC0415 (imports TensorFlow)
  from psp_jax.inference import evaluation  # noqa: PLC0415 (imports TensorFlow)

  path = run_dir / RESULT_FILE
  if path.is_file():
    stored = json.loads(path.read_text())
    if stored.get('config') != _fingerprint(config):
      raise RuntimeError(
        f'{path} was written with another config (the code or a flag changed): delete '
        f'{run_dir} to rerun it, or use another --workdir.'
      )
    return stored, True
  run_dir.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()
  trained = experiment.train_and_evaluate(config, str(run_dir))
  if trained['preempted']:
    raise KeyboardInterrupt(f'stopped at step {trained["step"]}; rerun to continue')
  train_seconds = time.perf_counter() - started
  started = time.perf_counter()
  checkpoint = run_dir / weights.LATEST_DIR / str(trained['step'])
  results = evaluation.evaluate(
    config, checkpoint if checkpoint.is_dir() else run_dir, progress=False
  )
  result = dict(
    variant=variant,
    seed=seed,
    steps=trained['step'],
    mIoU=results['mIoU'],
    mAcc=results['mAcc'],
    allAcc=results['allAcc'],
    iou={c['name']: c['iou'] for c in results['per_class']},
    setup=results['setup'],
    val_in_training={k: float(v) for k, v in trained['val'].items()},
    train_seconds=round(train_seconds, 1),
    eval_seconds=round(time.perf_counter() - started, 1),
    config=_fingerprint(config),
  )
  tmp = path.with_suffix('.tmp')
  tmp.write_text(json.dumps(result, indent=2) + '\n')
  tmp.replace(path)  # Atomic: a result file is always complete.
  return result, False


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(round(seconds), 60)
  return f'{minutes} min {seconds:02d} s' if minutes else f'{seconds} s'


def run_all(args) -> tuple[list[dict], float]:
  """Every variant x seed in order (seed-major, so a cut-short grid covers every variant).

  Returns:
    (results, wall seconds spent training and evaluating in this invocation).
  """
  runs = [(v, s) for s in args.seeds for v in args.variants]
  results, spent, trained = [], 0.0, 0
  base = pathlib.Path(args.workdir) / f's{args.steps}'
  for index, (variant, seed) in enumerate(runs, 1):
    run_dir = base / variant / f'seed{seed}'
    config = make_config(variant, seed, args.steps, quick=args.quick, data_dir=args.data_dir)
    print(
      f'[{index}/{len(runs)}] {variant} seed {seed} ({args.steps} steps): {run_dir}', flush=True
    )
    started = time.perf_counter()
    result, skipped = run_one(variant, seed, config, run_dir)
    results.append(result)
    if skipped:
      print(
        f'[{index}/{len(runs)}] {variant} seed {seed}: done earlier, skipped '
        f'(mIoU {100 * result["mIoU"]:.2f})',
        flush=True,
      )
      continue
    spent += time.perf_counter() - started
    trained += 1
    left = sum(1 for v, s in runs[index:] if not (base / v / f'seed{s}' / RESULT_FILE).is_file())
    eta = f', ETA {_duration(spent / trained * left)} for {left} more' if left else ''
    print(
      f'[{index}/{len(runs)}] {variant} seed {seed}: mIoU {100 * result["mIoU"]:.2f} '
      f'allAcc {100 * result["allAcc"]:.2f} in {_duration(time.perf_counter() - started)}'
      f'{eta}',
      flush=True,
    )
  return results, spent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  """Command-line flags, with --quick's and the defaults filled in."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--steps',
    type=int,
    default=None,
    help=f'training steps per run (default {ablation_config.STEPS})',
  )
  parser.add_argument(
    '--seeds',
    default=None,
    help=f'comma-separated seeds (default {",".join(map(str, DEFAULT_SEEDS))})',
  )
  parser.add_argument(
    '--variants',
    default=None,
    help='comma-separated variants of configs/ablation.py, "core" (default: '
    'Table 1 and alpha 0) or "all"',
  )
  parser.add_argument(
    '--workdir', default=None, help='where runs go (default runs/ablation; --quick: a temp dir)'
  )
  parser.add_argument(
    '--out_dir',
    default=None,
    help='where ablation.md and ablation.png go (default docs; --quick: the workdir)',
  )
  parser.add_argument('--data_dir', default=None, help='TFDS data_dir (--quick: in the workdir)')
  parser.add_argument(
    '--compilation_cache_dir',
    default=os.environ.get('JAX_COMPILATION_CACHE_DIR', os.path.expanduser('~/.cache/psp_jax/xla')),
    help='persistent XLA compilation cache; empty: off',
  )
  parser.add_argument(
    '--quick', action='store_true', help='tiny network, data and step count, for tests (< 1 min)'
  )
  args = parser.parse_args(argv)
  if args.quick:
    args.workdir = args.workdir or tempfile.mkdtemp(prefix='ablation_quick_')
    args.data_dir = args.data_dir or os.path.join(args.workdir, 'tfds')
  args.workdir = args.workdir or str(ROOT / 'runs' / 'ablation')
  args.out_dir = args.out_dir or (args.workdir if args.quick else str(ROOT / 'docs'))
  args.steps = args.steps or (QUICK['steps'] if args.quick else ablation_config.STEPS)
  if args.seeds:
    args.seeds = tuple(int(s) for s in args.seeds.split(','))
  else:
    args.seeds = QUICK['seeds'] if args.quick else DEFAULT_SEEDS
  names = {'core': ablation_config.CORE_VARIANTS, 'all': tuple(ablation_config.VARIANTS)}
  if args.variants in names:
    args.variants = names[args.variants]
  elif args.variants:
    args.variants = tuple(args.variants.split(','))
  else:
    args.variants = QUICK['variants'] if args.quick else ablation_config.CORE_VARIANTS
  unknown = sorted(set(args.variants) - set(ablation_config.VARIANTS))
  if unknown:
    parser.error(f'unknown variants {unknown}; known: {list(ablation_config.VARIANTS)}')
  if args.steps < 1 or not args.seeds:
    parser.error('--steps must be >= 1 and --seeds non-empty')
  return args


def environment(args, spent: float, results: list[dict]) -> dict:
  """What the report says about how its numbers were made."""
  import jax  # noqa: PLC0415

  return dict(
    date=datetime.date.today().isoformat(),
    command=' '.join(['python benchmarks/ablation.py', *sys.argv[1:]]),
    steps=args.steps,
    seeds=list(args.seeds),
    jax=jax.__version__,
    machine=f'{platform.machine()}, {os.cpu_count()} CPU cores, {jax.default_backend()}',
    # Per-run times as stored: what the whole grid costs, not just this invocation.
    total_seconds=sum(r['train_seconds'] + r['eval_seconds'] for r in results),
    this_invocation_seconds=spent,
    quick=args.quick,
  )


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  import jax  # noqa: PLC0415

  from psp_jax import distributed  # noqa: PLC0415

  distributed.set_cpu_xla_flags()
  if args.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', args.compilation_cache_dir)
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
  runtime.setup()
  runs = len(args.variants) * len(args.seeds)
  print(
    f'{runs} runs: {len(args.variants)} variants x seeds {list(args.seeds)}, '
    f'{args.steps} steps each; runs in {args.workdir}, report in {args.out_dir}',
    flush=True,
  )
  started = time.perf_counter()
  try:
    results, spent = run_all(args)
  except KeyboardInterrupt as e:
    print(
      f'Interrupted ({e or "Ctrl-C"}): finished runs are kept and the current one has a '
      'checkpoint; rerun the same command to continue.',
      flush=True,
    )
    raise SystemExit(130) from None
  env = environment(args, spent, results)
  md_path, png_path = ablation_report.write(results, env, args.out_dir)
  print(f'wrote {md_path} and {png_path} ({_duration(time.perf_counter() - started)})', flush=True)


if __name__ == '__main__':
  main()
