"""Ahead-of-time compilation for a Cloud TPU topology on any machine (the TPU pre-flight).

libtpu compiles for a described TPU slice without a TPU: `topology_mesh` gives the slice's
compile-only devices as the training mesh, `train_program` the train step of train.py with
its shardings and abstract inputs, `compile_report` XLA's per-chip memory and cost analysis,
our HBM traffic estimate (hbm.py), the collectives and a roofline estimate of the step.
Needs jax[tpu] (the `tpu` extra, in .venv-tpu: see the Makefile); nothing is allocated or run.
"""

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from psp_jax import distributed, errors
from psp_jax.data import datasets
from psp_jax.train import config_checks, hbm, tpu_chips, training

TOPOLOGY_FORMS = (
  'v5e:AxB or v6e:AxB (e.g. v5e:1x1, v5e:2x4, v5e:4x4, v6e:2x4) and '
  'v4:AxBxC, v5p:AxBxC or tpu7x:AxBxC (e.g. v4:2x2x1, v5p:2x2x1, tpu7x:2x2x1)'
)
_TOPOLOGY = re.compile(r'(v5e|v6e):\d+x\d+|(v4|v5p|tpu7x):\d+x\d+x\d+')
# An async pair (-start / -done) counts once, at its -done, whose shape is the result alone
# (a -start's shape is a tuple that also holds the operands).
_HBM_OOM = re.compile(r'\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)')


class TopologyError(errors.UsageError, ValueError):
  """A topology name that libtpu does not describe; the message lists the accepted forms."""


class DoesNotFitError(errors.UserError, RuntimeError):
  """A program needs more HBM than a device has (libtpu's compile fails); str() says all.

  Attributes:
    needed: bytes a device would need (None if libtpu did not say).
    available: bytes the compiler may use on a device.
  """

  def __init__(
    self,
    program: 'Program',
    needed: int | None,
    available: int,
    detail: str,
    device: str = 'a chip',
  ):
    """device: Chip.device, what the bytes are of ('a chip'; on TPU7x a device, half one)."""
    gib = tpu_chips.GiB
    if needed is None:
      amount = f'more than the {available / gib:.2f} GiB of HBM {device} has ({detail})'
    else:
      amount = (
        f'{needed / gib:.2f} GiB {device}, {available / gib:.2f} GiB available: '
        f'{(needed - available) / gib:.2f} GiB missing'
      )
    super().__init__(f'{program.what} does not fit: {amount}. To fit: {program.remedy}.')
    self.needed, self.available = needed, available


@dataclasses.dataclass(frozen=True)
class Topology:
  """A described TPU slice: its compile-only devices as the training mesh."""

  name: str
  chip: tpu_chips.Chip
  mesh: Mesh
  hosts: int

  @property
  def generation(self) -> str:
    """The key of tpu_chips.CHIPS and tpu_chips.PRICES, e.g. 'v5e'."""
    return self.name.split(':')[0]

  @property
  def chips(self) -> int:
    """Chips of the slice (mesh.size counts JAX devices: twice the chips on TPU7x)."""
    return self.mesh.size // self.chip.devices_per_chip


@contextlib.contextmanager
def _native_stderr_discarded() -> Iterator[None]:
  """Drops what native code writes to stderr inside the block.

  libtpu, looking for the TPU VM metadata that a compile-only topology does not need,
  writes several warnings straight to file descriptor 2 on every start; its errors still
  arrive as exceptions.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with open(os.devnull, 'w') as null:
    os.dup2(null.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def topology_mesh(name: str) -> Topology:
  """The device mesh (psp_jax.distributed.create_mesh, no spatial split) over a TPU slice.

  Hosts are as on Cloud TPU VMs: 8 chips on one host for v5e and v6e slices of up to
  8 chips, 4 chips a host otherwise (libtpu's default puts 4 on every host). v4 is
  described in megacore mode: one JAX device per chip, as on a v4 VM; TPU7x shows one
  device per TensorCore, two a chip (tpu7x:2x2x1: 4 chips, 8 devices).

  Args:
    name: e.g. 'v5e:2x4' (a v5litepod-8), 'v4:2x2x1' (a v4-8).

  Returns:
    Topology; mesh.size is the number of JAX devices (chips, but for TPU7x's two a chip).

  Raises:
    TopologyError: a name outside TOPOLOGY_FORMS, or one libtpu rejects.
  """
  from jax.experimental import topologies  # noqa: PLC0415 (needs jax[tpu] only here)

  if not _TOPOLOGY.fullmatch(name.strip()):
    raise TopologyError(f'--topology {name!r}: expected {TOPOLOGY_FORMS}.')
  if importlib.util.find_spec('libtpu') is None:
    raise TopologyError('compiling for TPU needs libtpu: run `make preflight-setup` (.venv-tpu).')
  generation, shape = name.strip().split(':')
  dims = tuple(int(d) for d in shape.split('x'))
  kwargs: dict[str, Any] = {}
  if generation == 'v4':
    kwargs['chip_config_name'] = 'megacore'
  if generation in ('v5e', 'v6e') and math.prod(dims) <= 8:
    kwargs['chips_per_host_bounds'] = (*dims, 1)
  # Compile-only: this process never owns a TPU, so it must not take libtpu's one-process
  # lock either (concurrent pre-flights, or one on a TPU VM while training runs there).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    with _native_stderr_discarded():
      devices = topologies.get_topology_desc(
        platform='tpu', topology_name=name.strip(), **kwargs
      ).devices
  except jax.errors.JaxRuntimeError as e:  # e.g. a shape this generation cannot have.
    raise TopologyError(
      f'--topology {name!r}: libtpu rejects it ({e}); use {TOPOLOGY_FORMS}.'
    ) from None
  hosts = len({d.process_index for d in devices})
  return Topology(
    name.strip(), tpu_chips.CHIPS[generation], distributed.create_mesh(devices), hosts
  )


@dataclasses.dataclass
class Program:
  """A jitted function and the abstract arguments to lower it with."""

  what: str
  jitted: Any
  args: tuple
  kwargs: dict[str, Any]
  images_per_step: int
  remedy: str  # The config changes that make it smaller, for the does-not-fit message.


def total_steps(config: ml_collections.ConfigDict) -> int:
  """Optimiser steps of the run: num_train_steps, or num_epochs x datasets.train_images.

  Raises:
    config_checks.ConfigError: an epoch recipe on a data set of unknown size.
  """
  num_train = datasets.train_images(config.data.name)
  if config.num_train_steps <= 0 and num_train is None:
    known = sorted(name for name in datasets.DATASETS if datasets.train_images(name))
    raise config_checks.ConfigError(
      f'config.num_epochs: the size of {config.data.name!r} is unknown here '
      f'(known: {known}); set config.num_train_steps.'
    )
  return config_checks.num_train_steps(config, num_train)


def train_program(config: ml_collections.ConfigDict, topology: Topology) -> Program:
  """train.py's step for the topology, from abstract inputs.

  training.build builds it, as it does for train.py's loop: codec.of_experiment
  for 'tpu' ('auto' is bfloat16), the optimiser over the recipe's steps, the abstract
  TrainState replicated, the batch split on 'data', guard_nonfinite, the step's shardings
  and donation.

  Args:
    config: the training config (checked by config_checks.validate for the slice).
    topology: from topology_mesh.

  Returns:
    Program with args (state, batch, dropout key) as training.TrainingProgram describes them.
  """
  config_checks.validate(config, device_count=topology.mesh.size, process_count=topology.hosts)
  mesh = distributed.create_mesh(list(topology.mesh.devices.flat), config.spatial_partitions)
  built = training.build(config, mesh, 'tpu', total_steps(config))
  height, width = built.image_shape[1:3]
  what = (
    f'train step (PSPNet-{config.model.depth}, batch {config.batch_size}, crop '
    f'{height}x{width}, {built.model_config["dtype"]})'
  )
  accum = config.optim.grad_accum_steps
  remedy = (
    f'a smaller --config.batch_size (now {config.batch_size}), '
    f'--config.optim.grad_accum_steps={2 * accum} (the same batch in micro-batches), '
    f'--config.model.dtype=bfloat16 (now {config.model.dtype}), or a smaller '
    f'--config.data.crop_size (now {config.data.crop_size}); or a chip with more HBM'
  )
  args = (built.state, built.batch, built.key)
  return Program(what, built.step, args, {}, config.batch_size, remedy)


@contextlib.contextmanager
def progress(what: str, every_s: float = 30.0) -> Iterator[None]:
  """Prints 'compiling WHAT', the elapsed time every `every_s` seconds, and the total."""
  started = time.perf_counter()
  print(f'compiling {what} ...', file=sys.stderr, flush=True)
  done = threading.Event()

  def tick():
    while not done.wait(every_s):
      print(f'  ... {time.perf_counter() - started:.0f} s', file=sys.stderr, flush=True)

  ticker = threading.Thread(target=tick, daemon=True)
  ticker.start()
  try:
    yield
  finally:
    done.set()
    ticker.join()
    print(f'  {what}: {time.perf_counter() - started:.0f} s', file=sys.stderr, flush=True)


def hbm_shortfall(message: str, capacity: int) -> tuple[int | None, int]:
  """(needed, available) bytes of a device from libtpu's out-of-HBM message.

  Args:
    message: e.g. '... required for HLO temporaries (22.37G) exceeds available HBM (15.75G).'
      (libtpu's G are GiB: a v5e's 16 GiB shows as 15.75G once the runtime's share is off).
    capacity: a device's HBM, the answer when the message gives no figures.

  Returns:
    (needed or None, available).
  """
  match = _HBM_OOM.search(message)
  if not match:
    return None, capacity
  needed, unit, available, unit2 = match.groups()
  scale = {u: 1024 ** (i + 1) for i, u in enumerate('KMGT')}
  return int(float(needed) * scale[unit]), int(float(available) * scale[unit2])


def compile_program(program: Program, chip: tpu_chips.Chip) -> tuple[Any, float]:
  """Lowers and compiles a Program (progress on stderr).

  Returns:
    (the compiled object, compile seconds).

  Raises:
    DoesNotFitError: libtpu ran out of HBM (the message gives needed and available bytes).
  """
  started = time.perf_counter()
  try:
    with progress(program.what):
      compiled = program.jitted.lower(*program.args, **program.kwargs).compile()
  except jax.errors.JaxRuntimeError as e:
    text = str(e)
    if 'RESOURCE_EXHAUSTED' not in text:
      raise
    needed, available = hbm_shortfall(text, chip.device_hbm_bytes)
    detail = text.strip().splitlines()[0]
    raise DoesNotFitError(program, needed, available, detail, chip.device) from None
  return compiled, time.perf_counter() - started


def memory(compiled: Any) -> dict[str, int]:
  """Per-chip bytes of compiled.memory_analysis(), and 'total' live at the peak.

  total = arguments + outputs - aliased (the donated state is reused for the new one)
  + temporaries + generated code.
  """
  stats = compiled.memory_analysis()
  fields = ('argument', 'output', 'alias', 'temp', 'generated_code')
  out = {f: int(getattr(stats, f'{f}_size_in_bytes', 0) or 0) for f in fields}
  out['total'] = sum(out[f] for f in ('argument', 'output', 'temp', 'generated_code'))
  out['total'] -= out['alias']
  return out


def compile_report(program: Program, topology: Topology, steps: int | None = None) -> dict:
  """Compiles a Program for a topology and measures it.

  Args:
    program: from train_program (or any Program on topology.mesh).
    topology: from topology_mesh.
    steps: steps of the run, for the wall-time bound (None: no bound).

  Returns:
    {'what', 'compile_s', 'devices_per_chip', 'memory' (per device, see `memory`; a device is
    a chip but on TPU7x), 'hbm_bytes' and 'headroom_bytes' (a device's),
    'flops' (XLA's cost model), 'xla_bytes_accessed' (XLA's cost model: on TPU it counts a
    matmul or convolution several times over), 'hbm_traffic' (our estimate, psp_jax/train/
    hbm.py), 'traffic_exact', 'collectives' (per chip and step), 'compute_s' (FLOPs at the
    chip's peak: a lower bound), 'memory_s' (the estimate at the chip's HBM bandwidth: an
    estimate, not a bound), 'ici_traffic' and 'ici_s' (hbm.interconnect_bytes, at the chip's
    ICI bandwidth: an estimate; None without a figure for the chip), 'step_s' (the largest:
    the roofline estimate), 'bound' ('compute', 'memory' or 'interconnect'), 'images_per_s',
    'run_s' and 'run_lower_bound_s' (or None), 'breakdown'
    ({part: {'hbm_traffic', 'flops'}} in hbm.PART_NAMES order: the estimate, and our count of
    the convolutions' and dots' FLOPs, by model part)}.
  """
  chip = topology.chip
  compiled, compile_s = compile_program(program, chip)
  mem = memory(compiled)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost  # One dict per chip program.
  flops, accessed = float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))
  text = compiled.as_text()
  traffic = hbm.traffic(text)
  # cost_analysis()['optimal_seconds'] comes out negative for compile-only devices: the
  # bound is computed here. float32 uses the bfloat16 peak too: JAX's default matmul
  # precision runs float32 matmuls as bfloat16 passes on TPU, and a bound must not be high.
  # Per device: a TPU7x device is half a chip (its TensorCore, half the HBM and bandwidth).
  compute_s = flops / chip.device_peak_flops
  memory_s = traffic.bytes / chip.device_hbm_bytes_per_s
  coll = hbm.collectives(text)
  ici = hbm.interconnect_bytes(coll)
  ici_s = ici / (chip.ici_bytes_per_s / chip.devices_per_chip) if chip.ici_bytes_per_s else None
  times = {'compute': compute_s, 'memory': memory_s, 'interconnect': ici_s or 0.0}
  bound = max(times, key=times.get)
  step_s = times[bound]
  return dict(
    what=program.what,
    compile_s=compile_s,
    devices_per_chip=chip.devices_per_chip,
    memory=mem,
    hbm_bytes=chip.device_hbm_bytes,
    headroom_bytes=chip.device_hbm_bytes - mem['total'],
    flops=flops,
    xla_bytes_accessed=accessed,
    hbm_traffic=traffic.bytes,
    traffic_exact=traffic.exact,
    collectives=coll,
    ici_traffic=ici,
    compute_s=compute_s,
    memory_s=memory_s,
    ici_s=ici_s,
    step_s=step_s,
    bound=bound,
    images_per_s=program.images_per_step / step_s if step_s > 0 else None,
    run_s=steps * step_s if steps else None,
    run_lower_bound_s=steps * compute_s if steps else None,
    breakdown={
      part: dict(hbm_traffic=traffic.part_bytes[part], flops=traffic.part_flops[part])
      for part in hbm.PART_NAMES
    },
  )


def largest_batch(
  config: ml_collections.ConfigDict,
  topology: Topology,
  build: Callable[[ml_collections.ConfigDict, Topology], Program] = train_program,
  limit: int = 4096,
  known: dict[int, bool] | None = None,
) -> tuple[int | None, list[tuple[int, bool]]]:
  """The largest global batch that compiles, by doubling then bisecting (one compile each).

  Batches are multiples of grad_accum_steps x lcm(chips, loss_groups, 2), which validate
  accepts (each micro-batch splits over the chips and the loss groups, >= 2 images).

  Args:
    config: the training config (its batch_size is the first try).
    topology: from topology_mesh.
    build: makes the Program of a config (train_program).
    limit: the largest batch tried.
    known: {batch: fits} already compiled (not compiled again).

  Returns:
    (the largest batch that fits or None, [(batch, fits)] in the order tried).
  """
  micro = math.lcm(topology.mesh.size, config.optim.loss_groups, 2)
  unit = config.optim.grad_accum_steps * micro
  results, tried = dict(known or {}), []

  def fits(units: int) -> bool:
    batch = units * unit
    if batch not in results:
      trial = config.copy_and_resolve_references()
      trial.batch_size = batch
      try:
        compile_program(build(trial, topology), topology.chip)
        results[batch] = True
      except DoesNotFitError:
        results[batch] = False
    tried.append((batch, results[batch]))
    return results[batch]

  low, high = 0, max(1, config.batch_size // unit)
  while high * unit <= limit and fits(high):  # Double until one does not fit.
    low, high = high, 2 * high
  high = min(high, limit // unit + 1)
  while high - low > 1:  # low fits (or is 0), high does not (or is past the limit).
    middle = (low + high) // 2
    low, high = (middle, high) if fits(middle) else (low, middle)
  return (low * unit if low else None), tried
