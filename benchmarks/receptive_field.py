"""How far away a pixel's deciding context is, and how far a trained network looks for it.

  .venv/bin/python benchmarks/receptive_field.py \\
      runs/ablation/s200/baseline/seed0 runs/ablation/s200/b1236-avg-dr/seed0 \\
      --sizes 129,257 --out docs/receptive_field.png

Prints two markdown tables and draws them as one chart:

1. The data. For each synthetic image size in --sizes, the distance in pixels from every
   car, boat, cow and seal pixel of the first --images validation scenes to the nearest
   pixel that tells its scene from the look-alike one (psp_jax.data.synthetic.cue_distances:
   the road or the water under a vehicle; the ground, or the far band where it differs,
   around an animal).
2. Each trained checkpoint's effective receptive field (Luo et al., "Understanding the
   Effective Receptive Field in Deep Convolutional Neural Networks", NeurIPS 2016): the
   absolute gradient of the winning logit at the image centre with respect to the input
   (after the ImageNet normalisation), summed over RGB and averaged over the same scenes.
   The radii that hold 50 and 90% of it say where the network draws its decision from; the
   share beyond a distance says how much of the decision can come from that far.

The table adds, per image size, the radii of a gradient spread evenly over the image: a
network whose radii come close to those draws on the whole scene.
"""

import argparse
import functools
import pathlib
import sys

from psp_jax import runtime  # noqa: E402

runtime.quiet_tensorflow_env()  # Before anything below imports TensorFlow.

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from psp_jax.data import synthetic  # noqa: E402
from psp_jax.inference import planning, segmenter  # noqa: E402

FRACTIONS = (0.5, 0.9)


@functools.cache  # The data table and every checkpoint of a size read the same scenes.
def scenes(image_size: int, count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, str]]:
  """The first `count` validation scenes: (image uint8 [S, S, 3], label [S, S], scene)."""
  return [synthetic.render(seed, 'validation', i, image_size) for i in range(count)]


def cue_distances(examples) -> np.ndarray:
  """Cue distance (synthetic.cue_distances) of every object pixel of the examples."""
  return np.concatenate([synthetic.cue_distances(label, scene) for _, label, scene in examples])


def gradient_map(apply_fn, variables, images: np.ndarray, point: tuple[int, int]) -> np.ndarray:
  """Mean over images of |d winning logit at `point` / d normalised input|, RGB summed: [H, W].

  Args:
    apply_fn: (variables, x [N, H, W, 3]) -> logits [N, H, W, K] at the input's size.
    variables: the model's variables.
    images: uint8 [N, H, W, 3].
    point: (row, col) of the output pixel.
  """

  def winning_logit(x):
    logits = apply_fn(variables, x[None])[0, point[0], point[1]]
    return logits[jax.lax.stop_gradient(jnp.argmax(logits))]

  grads = jax.jit(jax.vmap(jax.grad(winning_logit)))
  x = (images.astype(np.float32) - planning.MEAN) / planning.STD
  total = np.zeros(images.shape[1:3], np.float64)
  for start in range(0, len(x), 4):  # Four at a time: a full-size backward pass is large.
    total += np.abs(np.asarray(grads(jnp.asarray(x[start : start + 4])))).sum((0, 3))
  return total / len(x)


def radial_stats(weights: np.ndarray, point: tuple[int, int], far: float) -> dict[str, float]:
  """Radii around `point` holding FRACTIONS of the weights, and their share beyond `far`."""
  rows, cols = np.indices(weights.shape)
  distance = np.hypot(rows - point[0], cols - point[1]).ravel()
  order = np.argsort(distance, kind='stable')
  cumulative = np.cumsum(weights.ravel()[order]) / weights.sum()
  radii = {
    f'r{round(100 * f)}': float(distance[order][np.searchsorted(cumulative, f)]) for f in FRACTIONS
  }
  return dict(radii, far=float(weights.ravel()[distance > far].sum() / weights.sum()))


def _name(checkpoint: pathlib.Path) -> str:
  """'b1236-avg-dr/seed0' for runs/ablation/s200/b1236-avg-dr/seed0."""
  return '/'.join(checkpoint.resolve().parts[-2:])


def chart(data_rows, maps, far: float, path: pathlib.Path) -> None:
  """Cue-distance histograms and one gradient map per checkpoint, side by side."""
  import matplotlib  # noqa: PLC0415 (a dev extra, only for the chart)

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 1 + len(maps), figsize=(4.2 * (1 + len(maps)), 4))
  axes = np.atleast_1d(axes)
  for size, distances in data_rows:
    axes[0].hist(distances, bins=60, histtype='step', density=True, label=f'{size} px scenes')
  axes[0].axvline(far, color='k', ls='--', lw=1)
  axes[0].set(
    xlabel='object pixel to nearest scene cue (px)', ylabel='density', title='Where the cue is'
  )
  axes[0].legend()
  for ax, (name, weights, point, stats) in zip(axes[1:], maps, strict=True):
    shown = ax.imshow(np.log10(weights / weights.max() + 1e-6), cmap='magma', vmin=-4, vmax=0)
    for key, style in (('r50', ':'), ('r90', '--')):
      ax.add_patch(plt.Circle(point[::-1], stats[key], fill=False, color='c', ls=style, label=key))
    ax.set_title(
      f'{name} on {weights.shape[0]} px scenes\nr50 {stats["r50"]:.0f}, r90 {stats["r90"]:.0f} px',
      fontsize=9,
    )
    ax.legend(loc='lower right', fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
  if maps:
    fig.colorbar(shown, ax=axes[-1], fraction=0.046, label='log10 of the largest')
  fig.suptitle("log10 |gradient| of the centre pixel's winning logit (effective receptive field)")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('checkpoints', nargs='*', help='training workdirs on synthetic data')
  parser.add_argument('--sizes', default='129,257', help='image sizes for the data table')
  parser.add_argument('--images', type=int, default=32, help='validation scenes used')
  parser.add_argument('--far', type=float, default=64.0, help='pixels counted as far')
  parser.add_argument('--out', default=None, help='write the chart to this PNG')
  args = parser.parse_args(argv)
  sizes = [int(s) for s in args.sizes.split(',') if s]

  print(f'| Scenes | object pixels | median cue distance | 90th percentile | > {args.far:g} px |')
  print('|---|---:|---:|---:|---:|')
  data_rows = []
  for size in sizes:
    d = cue_distances(scenes(size, args.images))
    print(
      f'| {size} px | {d.size:,} | {np.median(d):.0f} px | {np.percentile(d, 90):.0f} px | '
      f'{100 * (d > args.far).mean():.0f}% |'
    )
    data_rows.append((size, d))

  maps = []
  if args.checkpoints:
    print()
    print(f'| Checkpoint | scenes | r50 | r90 | gradient beyond {args.far:g} px |')
    print('|---|---:|---:|---:|---:|')
  for checkpoint in map(pathlib.Path, args.checkpoints):
    config = segmenter.run_config(checkpoint)
    if config is None or config.data.name != 'synthetic':
      raise SystemExit(f'{checkpoint}: not a training workdir of a synthetic-data run.')
    size = config.data.synthetic.image_size
    apply_fn, variables, _ = segmenter.load_model(checkpoint)
    images = np.stack([im for im, _, _ in scenes(size, args.images, config.data.synthetic.seed)])
    point = (size // 2, size // 2)
    weights = gradient_map(apply_fn, variables, images, point)
    stats = radial_stats(weights, point, args.far)
    print(
      f'| `{_name(checkpoint)}` | {size} px | {stats["r50"]:.0f} px | {stats["r90"]:.0f} px | '
      f'{100 * stats["far"]:.1f}% |',
      flush=True,
    )
    maps.append((_name(checkpoint), weights, point, stats))
  for size in sorted({weights.shape[0] for _, weights, _, _ in maps}):
    # A gradient spread evenly over the image: what a network that draws on all of it gives.
    flat = radial_stats(np.ones((size, size)), (size // 2, size // 2), args.far)
    print(
      f'| an even spread (reference) | {size} px | {flat["r50"]:.0f} px | {flat["r90"]:.0f} px | '
      f'{100 * flat["far"]:.1f}% |'
    )
  if args.out:
    chart(data_rows, maps, args.far, pathlib.Path(args.out))
    print(f'\nwrote {args.out}')


if __name__ == '__main__':
  main()
