"""Processes and devices: multi-host start-up, the device mesh, shardings, CPU XLA flags."""

import collections
import importlib.util
import itertools
import logging
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'
SPACE_AXIS = 'space'  # Image height (NHWC H), config.spatial_partitions devices.
# jaxlib 0.10 sends convolutions to YNNPACK on CPU, whose weight gradient is a badly shaped
# convolution; leaving individual convolutions to XLA's own emitter made a conv's backward
# pass about 2x faster on the machines we measured (benchmarks/NOTES.md, What was tried, 1).
CPU_XLA_FLAGS = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
_ACCELERATOR_PLUGINS = ('libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm7_plugin')


def cpu_only() -> bool:
  """True when JAX can only run on the CPU here (no accelerator plugin, or JAX_PLATFORMS=cpu).

  Decided without initialising a backend, so XLA flags can still be set afterwards.
  """
  platforms = os.environ.get('JAX_PLATFORMS', '') or str(jax.config.jax_platforms or '')
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def set_cpu_xla_flags() -> bool:
  """Adds CPU_XLA_FLAGS to XLA_FLAGS when JAX will run on the CPU and XLA_FLAGS is unset.

  Must run before JAX initialises a backend (XLA reads the flags then). A user's own
  XLA_FLAGS are never touched.

  Returns:
    Whether the flags were set.
  """
  if 'XLA_FLAGS' in os.environ or not cpu_only():
    return False
  os.environ['XLA_FLAGS'] = CPU_XLA_FLAGS
  return True


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Starts jax.distributed when this run spans several processes.

  With a coordinator address (argument, or JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES
  and JAX_PROCESS_ID in the environment) the processes are given explicitly, as for CPU
  tests on one machine. Under SLURM (srun with more than one task) and on a Cloud TPU VM,
  jax.distributed.initialize() finds the others itself (slurm_devices says which GPUs each
  task takes). Otherwise the run is one process and nothing happens.

  Args:
    coordinator_address: 'host:port' of process 0.
    num_processes: number of processes.
    process_id: this process's index.
  """
  if jax.distributed.is_initialized():
    return
  env = os.environ
  address = coordinator_address or env.get('JAX_COORDINATOR_ADDRESS')
  if address:
    num_processes = num_processes or int(env.get('JAX_NUM_PROCESSES', '0')) or None
    if process_id is None and 'JAX_PROCESS_ID' in env:
      process_id = int(env['JAX_PROCESS_ID'])
    if num_processes is None or process_id is None:
      raise ValueError(
        f'Coordinator {address} given without the number of processes and this process id: '
        'pass --num_processes and --process_id (or set JAX_NUM_PROCESSES and JAX_PROCESS_ID).'
      )
    jax.distributed.initialize(address, num_processes=num_processes, process_id=process_id)
  elif slurm_tasks(env) > 1:  # jax reads SLURM's variables: the job's first node coordinates.
    jax.distributed.initialize(local_device_ids=slurm_devices(env))
  elif importlib.util.find_spec('libtpu') is not None:
    try:  # A TPU VM: one process per host, found through the TPU metadata.
      jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:  # e.g. libtpu installed on a machine without TPUs.
      logging.warning('jax.distributed.initialize() failed (%s); running as one process.', e)


# How long meet() waits for the last process (a slow compile, restore or evaluation share).
MEET_TIMEOUT_S = 60 * 60
_meetings: collections.defaultdict[str, itertools.count] = collections.defaultdict(itertools.count)


def meet(name: str) -> None:
  """Waits until every process has come to the point `name` (nothing with one process).

  A barrier of jax's coordination service, which waits up to MEET_TIMEOUT_S. Called before
  a collective the processes may reach far apart (after a compile, a checkpoint read or an
  evaluation share that takes one process much longer than another): on the CPU, the first
  collective over a set of devices connects their processes (Gloo) with a deadline of 30 s
  that jax 0.10 does not let us set, and past it the run fails with 'Gloo context
  initialization failed' (seen in tests/test_slurm.py: one process initialised the model
  in 2 s, the other in 59 s). Elsewhere it costs one round trip to the coordinator.

  Args:
    name: the point; every process meets at the same names in the same order.
  """
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost  # noqa: PLC0415 (the public handle on jax's barrier)

  key = f'psp_jax: {name} {next(_meetings[name])}'
  multihost.get_barrier_sync_fn()(key=key, timeout_ms=MEET_TIMEOUT_S * 1000)


def allgather(x: Any, name: str, tiled: bool = False) -> Any:
  """multihost_utils.process_allgather(x, tiled) once every process has met at `name`."""
  meet(name)
  return multihost_utils.process_allgather(x, tiled=tiled)


# What srun sets for every task; jax's SLURM detection needs all of them.
SLURM_VARIABLES = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID')
SLURM_VARIABLES += ('SLURM_LOCALID',)


def slurm_tasks(env: dict[str, str] | os._Environ = os.environ) -> int:
  """Tasks of the SLURM job step this process is one of (0 outside srun)."""
  if not all(name in env for name in SLURM_VARIABLES):
    return 0
  return int(env['SLURM_NTASKS'])


def _tasks_on_this_node(env) -> int | None:
  """This node's task count, from SLURM_STEP_TASKS_PER_NODE ('8', '8(x2)', '8(x2),4')."""
  counts = []
  for part in env.get('SLURM_STEP_TASKS_PER_NODE', '').split(','):
    number, _, repeat = part.partition('(x')
    if number.strip().isdigit():
      counts += [int(number)] * int(repeat.rstrip(')') or 1)
  node = int(env.get('SLURM_NODEID', '0'))
  return counts[node] if node < len(counts) else None


def slurm_devices(env: dict[str, str] | os._Environ = os.environ) -> list[int] | None:
  """The local GPUs a SLURM task takes: all of its node's with one task a node, else None.

  jax's SLURM detection gives task i of a node GPU i alone (one task a GPU: `srun
  --ntasks-per-node=8 --gpus-per-task=1`). With one task a node (`--ntasks-per-node=1`),
  that would be GPU 0 alone: here the task takes every GPU SLURM gave the node
  (SLURM_GPUS_ON_NODE, else CUDA_VISIBLE_DEVICES). None leaves jax's choice.
  """
  if _tasks_on_this_node(env) != 1:
    return None
  if env.get('SLURM_GPUS_ON_NODE', '').isdigit():
    return list(range(int(env['SLURM_GPUS_ON_NODE'])))
  visible = [d for d in env.get('CUDA_VISIBLE_DEVICES', '').split(',') if d.strip()]
  return list(range(len(visible))) or None


def create_mesh(devices: list[jax.Device] | None = None, space: int = 1) -> Mesh:
  """A 2-D mesh ('data', 'space') over all devices of all processes.

  Consecutive devices (of one process where space allows) split an image's height; the
  batch is split over the rest. The axes are Auto, not the Explicit default of
  jax.make_mesh: sharded jit of flax Conv models fails to infer output shardings under
  Explicit axes.

  Args:
    devices: the devices (default: jax.devices(), every process's).
    space: devices an image is split over (config.spatial_partitions); must divide them.
  """
  devices = jax.devices() if devices is None else devices
  if space < 1 or len(devices) % space:
    raise ValueError(f'{space} spatial partitions do not divide {len(devices)} devices.')
  grid = np.asarray(devices).reshape(len(devices) // space, space)
  auto = jax.sharding.AxisType.Auto
  return Mesh(grid, (DATA_AXIS, SPACE_AXIS), axis_types=(auto, auto))


def batch_part(mesh: Mesh) -> tuple[int, int]:
  """(index, count): this process feeds part `index` of `count` equal parts of each batch.

  The part is the rows of the batch on this process's devices' 'data' positions; processes
  whose devices share those positions (an image split across processes) feed the same part.

  Raises:
    ValueError: this process's 'data' positions are not one contiguous run.
  """
  grid = mesh.devices
  rows = sorted(
    {i for i in range(grid.shape[0]) for d in grid[i] if d.process_index == jax.process_index()}
  )
  size = len(rows)
  if (
    not size
    or rows != list(range(rows[0], rows[0] + size))
    or rows[0] % size
    or grid.shape[0] % size
  ):
    raise ValueError(f'This process holds mesh rows {rows} of {grid.shape[0]}: not one equal part.')
  return rows[0] // size, grid.shape[0] // size


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimiser state, keys)."""
  return NamedSharding(mesh, PartitionSpec())


def replicated_key(mesh: Mesh, seed: int, *fold_in: int) -> jax.Array:
  """jax.random.key(seed), folded with each of fold_in, replicated over a mesh of any number
  of processes: made by a jitted function, since jax.device_put cannot place a typed key on
  devices of other processes (a raw uint32 key it can)."""

  def make() -> jax.Array:
    key = jax.random.key(seed)
    for data in fold_in:
      key = jax.random.fold_in(key, data)
    return key

  return jax.jit(make, out_shardings=replicated(mesh))()


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis split over the 'data' axis (whole images, replicated on 'space')."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def image_sharded(mesh: Mesh) -> NamedSharding:
  """[B, H, ...] with B split over 'data' and H over 'space' (XLA pads an H that does not
  divide, inside a jitted function; as an argument or result it must divide)."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS, SPACE_AXIS))


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in global order, as numpy.

  Args:
    array: [B, ...] sharded on its leading axis.

  Returns:
    [B / process_count, ...], the process-local part (what this process fed in).
  """
  shards = {}
  for shard in array.addressable_shards:
    start = (shard.index[0].start or 0) if shard.index else 0
    shards.setdefault(start, np.asarray(shard.data))
  return np.concatenate([shards[k] for k in sorted(shards)], axis=0)
