"""Single-convolution timings behind benchmarks/NOTES.md: XLA CPU vs PyTorch, per pass.

  .venv/bin/python benchmarks/conv_grads.py [--reps 5]

For PSPNet-50's typical training convolutions (batch 2, crop 473) this times, alternating
within one process: the forward, the weight gradient and the input gradient in XLA as
jax.vjp writes them, the weight gradient written as matrix products (psp_jax.models.cpu_conv_grad
conv_weight_grad: one dot for a 1x1 kernel, one per tap for k x k), and PyTorch's own
(torch.ops.aten.convolution_backward). Medians in ms.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from psp_jax import distributed  # noqa: E402

distributed.set_cpu_xla_flags()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from psp_jax.models import cpu_conv_grad, layers  # noqa: E402

# name: (batch, side, in, out, kernel, stride, dilation)
SHAPES = {
  'stem 3x3 64->64 @237': (2, 237, 64, 64, 3, 1, 1),
  'layer1 1x1 256->64 @119': (2, 119, 256, 64, 1, 1, 1),
  'layer3 1x1 1024->256 @60': (2, 60, 1024, 256, 1, 1, 1),
  'layer3 3x3 256 dil2 @60': (2, 60, 256, 256, 3, 1, 2),
  'layer4 3x3 512 dil4 @60': (2, 60, 512, 512, 3, 1, 4),
}


def median_ms(fn, reps: int) -> float:
  fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def timings(shape: tuple, reps: int, rng: np.random.Generator) -> list[float]:
  """Median ms of the seven columns for one convolution shape."""
  b, side, cin, cout, k, s, d = shape
  x = rng.standard_normal((b, side, side, cin), np.float32)
  w = rng.standard_normal((k, k, cin, cout), np.float32) * 0.05
  pad = d * (k - 1) // 2

  def conv(x, w, s=s, d=d, pad=pad):
    return layers.conv2d(x, w, s, d, pad)

  y, vjp = jax.vjp(jax.jit(conv), x, w)
  dy = jnp.asarray(rng.standard_normal(y.shape, np.float32))
  fwd = jax.jit(conv)
  wgrad = jax.jit(lambda x, dy, conv=conv, w=w: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
  dgrad = jax.jit(lambda w, dy, conv=conv, x=x: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
  dots = jax.jit(lambda x, dy, k=k, s=s, d=d, pad=pad: cpu_conv_grad.conv_weight_grad(
    x, dy, k, s, d, pad))  # fmt: skip
  ref = np.asarray(wgrad(x, dy))
  np.testing.assert_allclose(np.asarray(dots(x, dy)), ref, rtol=2e-3, atol=2e-3 * abs(ref).max())
  tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
  tdy = torch.from_numpy(np.asarray(dy)).permute(0, 3, 1, 2).contiguous()

  def torch_back(mask, tx=tx, tw=tw, tdy=tdy, s=s, d=d, pad=pad):
    return torch.ops.aten.convolution_backward(
      tdy, tx, tw, None, [s, s], [pad, pad], [d, d], False, [0, 0], 1, mask
    )

  runs = [
    lambda: fwd(x, w).block_until_ready(),
    lambda: wgrad(x, dy).block_until_ready(),
    lambda: dots(x, dy).block_until_ready(),
    lambda: dgrad(w, dy).block_until_ready(),
    lambda: torch.nn.functional.conv2d(tx, tw, None, s, pad, d),
    lambda: torch_back([False, True, False]),
    lambda: torch_back([True, False, False]),
  ]
  return [median_ms(fn, reps) for fn in runs]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--reps', type=int, default=5)
  args = parser.parse_args()
  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  print(f'XLA_FLAGS={os.environ.get("XLA_FLAGS")}, torch threads {threads}; ms, median')
  print('| conv | XLA fwd | XLA wgrad | XLA wgrad as dots | XLA dgrad | torch fwd | torch wgrad '
        '| torch dgrad |\n|---|---|---|---|---|---|---|---|')  # fmt: skip
  rng = np.random.default_rng(0)
  for name, shape in SHAPES.items():
    cells = timings(shape, args.reps, rng)
    print(f'| {name} | ' + ' | '.join(f'{c:.1f}' for c in cells) + ' |', flush=True)


if __name__ == '__main__':
  main()
