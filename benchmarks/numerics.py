"""bfloat16 against float32: PSPNet-50's logits at 473, forward and train step (a table).

  .venv/bin/python benchmarks/numerics.py [--size 473] [--depth 50]

The same random weights (He-initialised kernels, BatchNorm statistics drawn around 1: no
trained weights can be downloaded here) and the same smooth random image, run in float32
and in bfloat16 (parameters float32, as training keeps them): the relative L2 distance of
the main head's logits, their largest difference, and how many pixels' argmax class agree.
The same in train mode for both heads, and for the gradient of the training loss (bfloat16
with its float32 weight gradients, psp_jax.models.mixed_conv). On the CPU XLA computes bfloat16
convolutions in float32 and rounds their results, so the figures are those of the
bfloat16 storage of activations, the TPU's case, not of a TPU's accumulation order.
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from psp_jax import config_schema
from psp_jax.models import codec

# The tests' random weights (He-initialised kernels, BatchNorm statistics around 1).
sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests')
)
from helpers import random_variables  # noqa: E402


def smooth_image(size: int, batch: int, seed: int = 1) -> np.ndarray:
  """Normalised images of smooth colour fields plus noise (a photo's statistics, roughly)."""
  rng = np.random.default_rng(seed)
  coarse = rng.normal(0, 1, (batch, size // 16 + 1, size // 16 + 1, 3)).astype(np.float32)
  image = jax.image.resize(coarse, (batch, size, size, 3), 'linear')
  return np.asarray(image + rng.normal(0, 0.2, image.shape), np.float32)


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
  """(relative L2 of b against a, max |b - a| / max |a|, argmax agreement over the last axis)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  rel = float(np.linalg.norm(b - a) / np.linalg.norm(a))
  peak = float(np.abs(b - a).max() / np.abs(a).max())
  agree = float(np.mean(a.argmax(-1) == b.argmax(-1)))
  return rel, peak, agree


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=473, help='image side (8k + 1)')
  parser.add_argument('--depth', type=int, default=50, help='PSPNet depth')
  parser.add_argument('--classes', type=int, default=150, help='classes (ADE20K: 150)')
  args = parser.parse_args()
  config = config_schema.get_config()
  config.model.depth = args.depth
  config.data.num_classes = args.classes
  models = {}
  for dtype in ('float32', 'bfloat16'):
    config.model.dtype = dtype
    models[dtype] = codec.build_model(codec.of_experiment(config, 'cpu'), 'cpu')
  variables = random_variables(models['float32'])
  images = smooth_image(args.size, 2)
  labels = np.random.default_rng(2).integers(0, args.classes, images.shape[:3])

  def forward(model):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))

  def update(model):
    """The float32 gradient of the two heads' loss (train mode), and the two heads' logits."""

    def loss(params):
      (main, aux), _ = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        images,
        train=True,
        mutable=['batch_stats'],
        rngs={'dropout': jax.random.key(0)},
      )
      terms = []
      for logits in (main, aux):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        terms.append(-jnp.take_along_axis(logp, labels[..., None], axis=-1).mean())
      return terms[0] + 0.4 * terms[1], (main, aux)

    return jax.jit(jax.grad(loss, has_aux=True))

  outputs = {}
  for dtype, model in models.items():
    started = time.perf_counter()
    logits = forward(model)(variables, images)
    grads, heads = update(model)(variables['params'])
    flat = np.concatenate([np.ravel(np.asarray(g, np.float32)) for g in jax.tree.leaves(grads)])
    outputs[dtype] = [np.asarray(x, np.float32) for x in (logits, *heads)] + [flat]
    print(f'{dtype}: {time.perf_counter() - started:.0f} s', flush=True)
  print(
    f'\nPSPNet-{args.depth}, {args.classes} classes, 2 images of {args.size}x{args.size}, random '
    f'weights (seed 0); bfloat16 compute against float32, jax {jax.__version__}, CPU\n'
  )
  print('| output | relative L2 | max abs diff / max abs | argmax agreement |')
  print('|---|---:|---:|---:|')
  names = (
    'logits (eval: running statistics)',
    'logits (train mode: batch statistics, dropout)',
    'aux logits (train mode)',
    'gradient of the loss (train mode)',
  )
  for name, a, b in zip(names, outputs['float32'], outputs['bfloat16'], strict=True):
    rel, peak, agree = compare(a, b)
    cell = f'{agree:.4f}' if a.ndim > 1 else '-'
    print(f'| {name} | {rel:.2e} | {peak:.2e} | {cell} |')


if __name__ == '__main__':
  main()
