"""Command line: weights between PyTorch PSPNet checkpoints (semseg, mmseg) and the Flax PSPNet.

  python -m psp_jax.convert train_epoch_100.pth OUT_DIR   # .pth -> weights dir
  python -m psp_jax.convert OUT_DIR pspnet.pth            # weights dir (or workdir) -> .pth

A .pth's layout (hszhao/semseg's or mmsegmentation's) is recognised from its keys; the .pth
written is in the layout that holds the model as it is (mmseg's for an mmseg-variant model),
or the one --layout names. The checkpoint kinds: docs/design.md#checkpoints
"""

import argparse

from psp_jax import errors, weights
from psp_jax.interop import pth


@errors.report
def main(argv: list[str] | None = None) -> None:
  """Command line: .pth -> orbax checkpoint dir, or checkpoint dir -> .pth."""
  parser = argparse.ArgumentParser(prog='python -m psp_jax.convert', description=__doc__)
  parser.add_argument('src', help='official .pth file, or a checkpoint directory')
  parser.add_argument('dst', help='output directory (from .pth) or .pth file (from a dir)')
  parser.add_argument('--bins', type=int, nargs='+', help='PPM bin sizes if not 1 2 3 6')
  parser.add_argument('--depth', type=int, help='fail unless the weights are this depth')
  parser.add_argument('--num-classes', type=int, help='fail unless this many classes')
  parser.add_argument(
    '--layout',
    choices=pth.LAYOUTS,
    help='layout of the .pth written (default: semseg, or mmseg for an mmseg-variant model)',
  )
  parser.add_argument('--force', action='store_true', help='overwrite dst')
  args = parser.parse_args(argv)
  expect = {k: v for k, v in (('depth', args.depth), ('num_classes', args.num_classes)) if v}
  if args.bins:
    expect['bins'] = list(args.bins)
  weights.convert(args.src, args.dst, expect=expect, force=args.force, layout=args.layout)


if __name__ == '__main__':
  main()
