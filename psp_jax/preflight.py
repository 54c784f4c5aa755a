"""Command line: does a config's training fit a Cloud TPU slice, and how fast at best? (No TPU.)

  .venv-tpu/bin/python -m psp_jax.preflight --config configs/ade20k.py --topology v5e:2x4 \\
      [--config.KEY=VALUE ...] [--max_batch] [--noeval] [--breakdown] [--price USD]
      [--json PATH]

compiles, with libtpu for the described slice, the train step exactly as train.py runs it
and the window step of psp_jax.evaluate, and prints per chip the memory XLA assigns against
the chip's HBM, the FLOPs of a step (a lower bound on its time at the chip's peak), our
estimate of its HBM traffic beside XLA's count, its collectives, the roofline estimate, and
the recipe's hours and dollars (chips x on-demand price x hours; tpu_chips.PRICES, or --price).
On TPU7x, whose chips show two JAX devices each, figures are per device and per chip.
Exit status 1, with one message, when the step does not fit a chip or a config value cannot
work; 2 for a bad topology, flag or config key. `make preflight-setup` creates .venv-tpu.
"""

import os

# The pre-flight only compiles: JAX runs on the CPU, and never probes for (or takes) a TPU
# that libtpu, installed in .venv-tpu, would otherwise look for at backend start.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from psp_jax import errors  # noqa: E402
from psp_jax.data import datasets  # noqa: E402
from psp_jax.inference import planning, sliding_window  # noqa: E402
from psp_jax.models import codec  # noqa: E402
from psp_jax.train import aot, config_checks, tpu_chips  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags; defined only when run as a program, so importing stays clean."""
  config_flags.DEFINE_config_file('config', None, 'Training config file.')
  flags.DEFINE_string('topology', 'v5e:2x4', f'TPU slice: {aot.TOPOLOGY_FORMS}.')
  flags.DEFINE_boolean('max_batch', False, 'Also find the largest global batch that fits.')
  flags.DEFINE_boolean('eval', True, "Also compile psp_jax.evaluate's window step.")
  flags.DEFINE_boolean('breakdown', False, "The train step's HBM estimate and FLOPs by part.")
  flags.DEFINE_float(
    'price', None, 'USD per chip-hour (default: the price table, tpu_chips.PRICES).'
  )
  flags.DEFINE_string('json', None, 'Write the report as JSON to this file.')


def eval_program(config: ml_collections.ConfigDict, topology: aot.Topology) -> aot.Program:
  """psp_jax.evaluate's window step (sliding_window.scale_canvases) at its largest scale.

  As SlidingWindowInference runs it: one image per device of one host (each host evaluates
  its own images), config.eval.batch_size / chips windows a forward pass, the variables
  replicated. The canvas is plan_image's for a square base_size image (eval.resize='fit':
  a wide image filling fit_scale) at the largest of config.eval.scales: the largest any
  image gives in 'whole' mode, every image's in 'slide'.

  Returns:
    Program with args (variables, canvas float32 [n, Ch, Cw, 3], offsets int32 [n, G, 2],
    count int32 [n]), n the host's chips.
  """
  devices = [d for d in topology.mesh.devices.flat if d.process_index == 0]
  mesh = Mesh(np.asarray(devices), ('data',), axis_types=(AxisType.Auto,))
  windows = max(1, config.eval.batch_size // topology.mesh.size)
  procedure = planning.InferenceConfig.from_config(config, windows_per_step=windows)  # Checked.
  scale = max(procedure.scales)
  procedure = dataclasses.replace(procedure, scales=(scale,))
  size = (config.eval.base_size,) * 2
  if procedure.resize == 'fit':  # The largest image that fits (long, short) lies wide.
    size = (min(procedure.fit_scale), max(procedure.fit_scale))
  (first,) = planning.plan_image(np.zeros((*size, 3), np.uint8), procedure).scales
  model_config = codec.of_experiment(config, 'tpu')
  model = codec.build_model(model_config, 'tpu')
  image = jax.ShapeDtypeStruct((1, *first.crop, 3), np.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), image)
  replicated = NamedSharding(mesh, PartitionSpec())
  sharded = NamedSharding(mesh, PartitionSpec('data'))
  variables = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes
  )
  n = mesh.size
  args = (
    variables,
    jax.ShapeDtypeStruct((n, *first.canvas.shape), np.float32, sharding=sharded),
    jax.ShapeDtypeStruct((n, *first.offsets.shape), np.int32, sharding=sharded),
    jax.ShapeDtypeStruct((n,), np.int32, sharding=sharded),
  )
  kwargs = dict(
    apply_fn=lambda v, x: model.apply(v, x, train=False),
    mesh=mesh,
    num_classes=config.data.num_classes,
    crop=first.crop,
    flip=procedure.flip,
    per_step=windows,
    average=procedure.average,
  )
  height, width = first.canvas.shape[:2]
  what = (
    f'eval step ({procedure.mode}, scale {scale}: canvas {height}x{width}, '
    f'{len(first.offsets)} windows of {first.crop[0]}x{first.crop[1]}, {windows} a pass'
    f'{", flip" if procedure.flip else ""}, {model_config["dtype"]})'
  )
  remedy = (
    f'a smaller --config.eval.batch_size (now {config.eval.batch_size}: '
    f'{windows} windows a pass), --config.model.dtype=bfloat16 (now {config.model.dtype})'
    + (', or --config.eval.mode=slide' if procedure.mode == 'whole' else '')
  )
  return aot.Program(what, sliding_window.scale_canvases, args, kwargs, n, remedy)


def versions() -> dict[str, str]:
  """jax, jaxlib and libtpu versions: what the figures were compiled with."""
  out = {'jax': jax.__version__}
  for name in ('jaxlib', 'libtpu'):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = 'not installed'
  return out


def _gib(n: float) -> str:
  return f'{n / tpu_chips.GiB:.3f}'


def format_memory(report: dict[str, Any]) -> list[str]:
  """The per-chip memory lines of a compile_report."""
  mem, hbm = report['memory'], report['hbm_bytes']
  names = (
    ('argument', 'arguments'),
    ('output', 'outputs'),
    ('alias', 'aliased (donated)'),
    ('temp', 'temporaries'),
    ('generated_code', 'generated code'),
  )
  per = report.get('devices_per_chip', 1)
  unit = 'per chip' if per == 1 else f'per device (1/{per} chip)'
  lines = [f'  {unit:<24}GiB']
  lines += [f'  {label:<22}{_gib(mem[key]):>7}' for key, label in names]
  free = report['headroom_bytes']
  lines.append(
    f'  {"total live":<22}{_gib(mem["total"]):>7} of {hbm / tpu_chips.GiB:.2f} GiB HBM: '
    f'{free / tpu_chips.GiB:.2f} GiB headroom ({100 * free / hbm:.0f}%)'
  )
  if per > 1:
    lines.append(
      f'  {"per chip":<22}{_gib(per * mem["total"]):>7} of {per * hbm / tpu_chips.GiB:.2f} GiB HBM '
      f'({per} devices)'
    )
  return lines


def recipe(config: ml_collections.ConfigDict, steps: int) -> str:
  """Where the run's step count comes from, e.g. '126,300 steps (100 epochs x 1,263 ...)'."""
  if config.num_train_steps > 0:
    return f'{steps:,} steps (num_train_steps)'
  images = datasets.train_images(config.data.name)
  per_epoch = config_checks.steps_per_epoch(images, config.batch_size)
  return (
    f'{steps:,} steps ({config.num_epochs} epochs x {per_epoch:,} steps of {config.batch_size} '
    f"of {config.data.name}'s {images:,} training images)"
  )


def _size(n: int) -> str:
  """Bytes as MB, or as bytes below 0.1 MB (a few scalars' all-reduce)."""
  return f'{n / 1e6:.1f} MB' if n >= 100_000 else f'{n:,} B'


def bill(report: dict[str, Any], topology: aot.Topology, price: tpu_chips.Price | None) -> str:
  """The recipe's dollars: chips x price x hours, at the FLOP bound and the estimate."""
  if price is None:
    return (
      f'no public on-demand price for {topology.chip.name} in the price table: '
      '--price USD (per chip-hour) gives the dollars'
    )
  usd = topology.chips * price.usd_per_chip_hour / 3600
  return (
    f'>= ${report["run_lower_bound_s"] * usd:,.0f}, about ${report["run_s"] * usd:,.0f} '
    f'({topology.chips} chips x ${price.usd_per_chip_hour:.2f} a chip-hour x the hours; '
    f'on-demand, {price.source}, {price.date})'
  )


def format_train(
  report: dict[str, Any], topology: aot.Topology, run: str, price: tpu_chips.Price | None = None
) -> list[str]:
  """The train step's lines: memory, cost, collectives, roofline, the time and bill of `run`."""
  chip = topology.chip
  unit = 'chip' if chip.devices_per_chip == 1 else 'device'
  peak = chip.device_peak_flops
  bandwidth = chip.device_hbm_bytes_per_s
  lines = [f'{report["what"]}: compiled in {report["compile_s"]:.0f} s', *format_memory(report)]
  lines.append(
    f"  per step and {unit}: {report['flops'] / 1e12:.3f} TFLOP (XLA's cost model); HBM "
    f'traffic {report["hbm_traffic"] / 1e9:.2f} GB (our estimate from the optimised HLO'
    + ('' if report['traffic_exact'] else ', a loop without a trip count counted once')
    + f'); XLA\'s "bytes accessed" {report["xla_bytes_accessed"] / 1e9:.2f} GB (its cost '
    'model, which counts a TPU matmul or convolution several times over: not used)'
  )
  coll = report['collectives']
  parts = [
    f'{k} {v["count"]} x {v["bytes"] / 1e6:.1f} MB ('
    + ', '.join(f'{t} {_size(b)}' for t, b in sorted(v['dtypes'].items()))
    + ')'
    for k, v in sorted(coll.items())
  ]
  lines.append(f'  collectives per step and {unit}: {"; ".join(parts) or "none"}')
  share = '' if unit == 'chip' else f", a device's 1/{chip.devices_per_chip} of the chip's"
  if report.get('ici_s') is None:
    ici = ', interconnect not counted (no ICI figure for this chip)'
  else:
    ici = (
      f', ICI {report["ici_s"] * 1e3:.1f} ms (our estimate: {report["ici_traffic"] / 1e9:.2f} '
      f'GB sent and received at {chip.ici_bytes_per_s / 1e9:.0f} GB/s, every link busy)'
    )
  lines.append(
    f'  roofline: FLOPs {report["compute_s"] * 1e3:.1f} ms a step (a lower bound: '
    f'{peak / 1e12:.0f} TFLOP/s bf16 peak{share}), HBM {report["memory_s"] * 1e3:.1f} ms '
    f'(the estimate at {bandwidth / 1e9:.0f} GB/s; {chip.source}){ici}: '
    f'{report["bound"]}-bound, about {report["step_s"] * 1e3:.1f} ms, '
    f'{report["images_per_s"]:.0f} images/s'
  )
  lines.append(
    f'  recipe: {run}: >= {report["run_lower_bound_s"] / 3600:.2f} h of {topology.name} '
    f'(FLOPs at peak), about {report["run_s"] / 3600:.2f} h at the roofline estimate; real '
    'steps are slower'
  )
  lines.append(f'  bill: {bill(report, topology, price)}')
  return lines


def format_breakdown(report: dict[str, Any]) -> list[str]:
  """The train step's estimate and FLOPs by model part, with totals that add up."""
  parts = report['breakdown']
  traffic = sum(p['hbm_traffic'] for p in parts.values())
  ours = sum(p['flops'] for p in parts.values())
  lines = [
    '  by model part, per step and chip (HBM: our estimate; FLOPs: our count of the',
    "  convolutions and dots in the optimised HLO; a fused op is charged to its op_name's part):",
    f'    {"part":<22}{"HBM GB":>8}{"share":>7}{"TFLOP":>9}{"share":>7}',
  ]
  for name, p in parts.items():
    if p['hbm_traffic'] or p['flops']:
      lines.append(
        f'    {name:<22}{p["hbm_traffic"] / 1e9:>8.2f}{p["hbm_traffic"] / traffic:>7.1%}'
        f'{p["flops"] / 1e12:>9.3f}{p["flops"] / ours if ours else 0:>7.1%}'
      )
  lines.append(f'    {"total":<22}{traffic / 1e9:>8.2f}{1:>7.0%}{ours / 1e12:>9.3f}{1:>7.0%}')
  lines.append(
    f"    XLA's cost model: {report['flops'] / 1e12:.3f} TFLOP, "
    f'{(report["flops"] - ours) / 1e12:+.3f} beside our count (its element-wise ops and '
    'reductions, less any difference in counting convolutions)'
  )
  return lines


@errors.report
def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise errors.UsageError(f'unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  if config is None:
    raise errors.UsageError('--config is required')
  # The persistent cache cannot read back programs of compile-only devices: writing them
  # (a JAX_COMPILATION_CACHE_DIR in the environment) would only fill the disk.
  jax.config.update('jax_enable_compilation_cache', False)
  topology = aot.topology_mesh(FLAGS.topology)
  steps = aot.total_steps(config)
  train = aot.train_program(config, topology)
  price = tpu_chips.PRICES[topology.generation]
  if FLAGS.price is not None:
    if FLAGS.price <= 0:
      raise errors.UsageError(f'--price {FLAGS.price}: give USD per chip-hour, above 0')
    price = tpu_chips.Price(FLAGS.price, '--price', datetime.date.today().isoformat())
  window_step = eval_program(config, topology) if FLAGS.eval else None  # Checks config.eval.
  chip = topology.chip
  head = (
    f'TPU pre-flight: {FLAGS["config"].config_filename} on {topology.name} '
    f'({topology.chips} x {chip.name}'
    + (f' = {topology.mesh.size} devices' if chip.devices_per_chip > 1 else '')
    + f', {topology.hosts} host'
    f'{"s" if topology.hosts > 1 else ""}); {", ".join(f"{k} {v}" for k, v in versions().items())}'
  )
  print(head, flush=True)
  result: dict[str, Any] = dict(date=datetime.date.today().isoformat(), topology=topology.name)
  result['chips'], result['devices'] = topology.chips, topology.mesh.size
  result.update(hosts=topology.hosts, chip=chip.name, versions=versions(), steps=steps)
  failure = None
  try:
    result['train'] = aot.compile_report(train, topology, steps)
    report = result['train']
    print('\n'.join(format_train(report, topology, recipe(config, steps), price)), flush=True)
    if price is not None:
      usd = topology.chips * price.usd_per_chip_hour / 3600
      result['price'] = dataclasses.asdict(price)
      result['run_lower_bound_usd'] = report['run_lower_bound_s'] * usd
      result['run_usd'] = report['run_s'] * usd
    if FLAGS.breakdown:
      print('\n'.join(format_breakdown(result['train'])), flush=True)
    if FLAGS.eval:
      result['eval'] = aot.compile_report(window_step, topology)
      report = result['eval']
      print(f'{report["what"]}: compiled in {report["compile_s"]:.0f} s', flush=True)
      print('\n'.join(format_memory(report)), flush=True)
  except aot.DoesNotFitError as e:
    failure = str(e)
  if FLAGS.max_batch:
    known = {config.batch_size: 'train' in result}
    best, tried = aot.largest_batch(config, topology, known=known)
    result['max_batch'], result['max_batch_tried'] = best, tried
    steps_tried = ', '.join(f'{b} {"fits" if ok else "no"}' for b, ok in tried)
    verdict = best if best is not None else 'none, not even the smallest tried'
    print(f'largest global batch that fits: {verdict} (tried: {steps_tried})', flush=True)
    if failure is not None and best is not None:
      failure += f' (--max_batch: --config.batch_size={best} fits.)'

  result['fits'], result['message'] = failure is None, failure
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(result, f, indent=1)
  if failure is not None:
    raise errors.UserError(failure)
  print(f'fits: yes, {topology.name} can run this config.')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=errors.parse_flags)
