"""Does an exported model give the in-process model's answer? Images, measures and bounds.

Both sides see the same uint8 images; logits must be within relative L2 1e-5, labels equal
on 99.99% of pixels. Design: docs/serving.md#the-parity-check
"""

import dataclasses
from typing import Any

import numpy as np

from psp_jax import errors

MAX_REL_L2 = 1e-5
MIN_LABEL_AGREEMENT = 0.9999


class ParityError(errors.UserError):
  """An artifact whose output is not the in-process model's (the message has the numbers)."""


@dataclasses.dataclass(frozen=True)
class ParityReport:
  """One artifact against the in-process model on the same images.

  Attributes:
    output: what was compared ('labels', 'logits' or 'probs').
    images: how many images ([N, H, W, 3]).
    rel_l2: ||artifact - reference|| / ||reference|| of the scores (None for labels).
    max_abs: largest absolute difference of the scores (None for labels).
    label_agreement: fraction of pixels whose label (argmax) is the reference's.
    pixels: pixels compared.
  """

  output: str
  images: int
  rel_l2: float | None
  max_abs: float | None
  label_agreement: float
  pixels: int

  @property
  def passed(self) -> bool:
    scores_ok = self.rel_l2 is None or self.rel_l2 <= MAX_REL_L2
    return scores_ok and self.label_agreement >= MIN_LABEL_AGREEMENT

  def summary(self) -> str:
    """e.g. 'logits rel L2 8.2e-07 (bound 1e-05), max abs 8.5e-05, labels 100.0000% equal ...'."""
    parts = []
    if self.rel_l2 is not None:
      parts.append(
        f'{self.output} rel L2 {self.rel_l2:.2e} (bound {MAX_REL_L2:.0e}), '
        f'max abs {self.max_abs:.2e}'
      )
    parts.append(
      f'labels {100 * self.label_agreement:.4f}% equal (bound {100 * MIN_LABEL_AGREEMENT:.2f}%)'
    )
    images = f'{self.images} image' + ('s' if self.images != 1 else '')
    return ', '.join(parts) + f' on {images} of {self.pixels // self.images} pixels'

  def as_json(self) -> dict[str, Any]:
    bounds = {'max_rel_l2': MAX_REL_L2, 'min_label_agreement': MIN_LABEL_AGREEMENT}
    return {**dataclasses.asdict(self), 'passed': self.passed, 'bounds': bounds}


def images(count: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
  """uint8 [count, H, W, 3] test images: smooth colour fields with blocks and some noise.

  Not pure noise: a trained network's classes then tie less often than on white noise, and
  the images still cover the whole 0..255 range of every channel.
  """
  rng = np.random.default_rng(seed)
  height, width = size
  yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing='ij')
  out = []
  for _ in range(count):
    base = rng.uniform(0, 255, 3) * (1 - yy[..., None]) + rng.uniform(0, 255, 3) * xx[..., None]
    for _ in range(4):
      top, left = rng.integers(0, height), rng.integers(0, width)
      base[top : top + height // 3, left : left + width // 3] = rng.uniform(0, 255, 3)
    base += rng.normal(0, 12, base.shape)
    out.append(np.clip(np.rint(base), 0, 255).astype(np.uint8))
  return np.stack(out)


def compare(output: str, artifact: np.ndarray, reference_logits: np.ndarray) -> ParityReport:
  """ParityReport of an artifact's output against the in-process logits.

  Args:
    output: the artifact's kind of output.
    artifact: its output, int32 [N, H, W] labels or float32 [N, H, W, K] scores.
    reference_logits: float32 [N, H, W, K], the in-process model on the same images.
  """
  reference_logits = np.asarray(reference_logits, np.float64)
  labels = np.argmax(reference_logits, axis=-1)
  artifact = np.asarray(artifact)
  rel_l2 = max_abs = None
  if output == 'labels':
    got = artifact
  else:
    reference = reference_logits
    if output == 'probs':
      shifted = np.exp(reference_logits - reference_logits.max(axis=-1, keepdims=True))
      reference = shifted / shifted.sum(axis=-1, keepdims=True)
    diff = artifact.astype(np.float64) - reference
    rel_l2 = float(np.linalg.norm(diff) / max(np.linalg.norm(reference), 1e-30))
    max_abs = float(np.abs(diff).max())
    got = np.argmax(artifact, axis=-1)
  if got.shape != labels.shape:
    raise ParityError(f'the artifact returned shape {artifact.shape}, expected {labels.shape}')
  return ParityReport(
    output=output,
    images=len(labels),
    rel_l2=rel_l2,
    max_abs=max_abs,
    label_agreement=float(np.mean(got == labels)),
    pixels=int(labels.size),
  )
