"""Latency of the exported formats against the in-process JAX model (psp_jax.export).

  python benchmarks/export_latency.py                       # PSPNet-50, 150 classes, random
  python benchmarks/export_latency.py --checkpoint runs/ade20k --size 512x512 --repeats 10

Exports one model (a checkpoint, or PSPNet-50 with random weights) in each format through
psp_jax.serving.exporter (each passes its parity check first), then times one batch of
uint8 images per call: the in-process model as psp_jax runs it (jax.jit of the serving
function, weights as arguments), the StableHLO artifact (jax.export's call), the SavedModel
(its serving_default signature under TensorFlow) and the ONNX file (onnxruntime, CPU
provider). The calls alternate round-robin, so a change of machine load hits every format
alike; the table gives the median and the fastest call of each, and the artifacts' sizes.
Threads: each runtime's default (XLA and onnxruntime use every core; TensorFlow its
default pools); say so next to the numbers.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from psp_jax import runtime  # noqa: E402
from psp_jax.models import PSPNet  # noqa: E402
from psp_jax.serving import artifact, contract, exporter, formats, parity  # noqa: E402


def random_model(num_classes: int, depth: int, seed: int = 0) -> exporter.Exporter:
  """PSPNet of `depth` with random weights and BatchNorm statistics (shapes only, no init)."""
  config = dict(num_classes=num_classes, depth=depth)
  net = PSPNet(**config)
  shapes = jax.eval_shape(
    lambda k: net.init({'params': k}, np.zeros((1, 33, 33, 3), np.float32), train=False),
    jax.random.key(0),
  )
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':  # He initialisation keeps activations O(1) through the ResNet.
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  return exporter.Exporter(lambda v, x: net.apply(v, x, train=False), variables, config)


def cpu_name() -> str:
  """The CPU's model name (Linux), else the machine type."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.machine()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--checkpoint', help='a checkpoint (default: random PSPNet-50)')
  parser.add_argument('--depth', type=int, default=50)
  parser.add_argument('--num-classes', type=int, default=150)
  parser.add_argument('--size', default='512x512')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--outputs', default='labels', choices=contract.OUTPUTS)
  parser.add_argument('--repeats', type=int, default=5, help='timed calls per format')
  parser.add_argument('--workdir', help='where the artifacts go (default: a temporary folder)')
  args = parser.parse_args()
  runtime.setup()
  size = contract.parse_size(args.size)
  if args.checkpoint:
    model = exporter.Exporter.from_checkpoint(args.checkpoint)
  else:
    model = random_model(args.num_classes, args.depth)
  workdir = args.workdir or tempfile.mkdtemp(prefix='export_latency_')
  images = parity.images(args.batch, size, seed=1)

  serve = jax.jit(formats.serving_function(model.apply_fn, args.outputs))
  calls = {'in-process JAX (jit)': lambda x: np.asarray(serve(model.variables, x))}
  sizes = {'in-process JAX (jit)': None}
  for fmt in contract.FORMATS:
    folder = os.path.join(workdir, fmt)
    model.export(
      fmt, folder, size=size, batch=args.batch, outputs=args.outputs, overwrite=True, log=print
    )
    calls[fmt] = artifact.open_artifact(folder).call
    sizes[fmt] = exporter.folder_size(folder, fmt)

  times: dict[str, list[float]] = {name: [] for name in calls}
  for name, call in calls.items():  # Warm-up: compilation, first-run allocations.
    start = time.perf_counter()
    call(images)
    print(f'first call of {name}: {time.perf_counter() - start:.2f} s', flush=True)
  for _ in range(args.repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      call(images)
      times[name].append(time.perf_counter() - start)

  print()
  print(
    f'{model.model_config["depth"]}-layer PSPNet, {args.size}, batch {args.batch}, '
    f'output {args.outputs}; {args.repeats} calls each, round-robin; {os.cpu_count()} CPUs '
    f'({cpu_name()}), load average {os.getloadavg()[0]:.1f} '
    'at the end; default threads of each runtime.'
  )
  print()
  print('| format | median (ms) | fastest (ms) | artifact size (MB) |')
  print('|---|---|---|---|')
  for name, values in times.items():
    size_mb = '-' if sizes[name] is None else f'{sizes[name] / 1e6:.1f}'
    median, fastest = 1e3 * statistics.median(values), 1e3 * min(values)
    print(f'| {name} | {median:.0f} | {fastest:.0f} | {size_mb} |')
  versions = contract.versions('onnx') | contract.versions('savedmodel')
  print()
  print('versions: ' + ', '.join(f'{k} {v}' for k, v in versions.items()))


if __name__ == '__main__':
  main()
