"""Segmentation metrics: confusion matrices on device, mIoU / mAcc / allAcc on the host.

The official protocol (hszhao/semseg util.intersectionAndUnion, tool/test.py cal_acc), or
mmseg's, from one confusion matrix summed over the split (rows ground truth, columns
prediction). Design: docs/design.md#evaluation-protocols
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PROTOCOLS = ('official', 'mmseg')
_EPS = 1e-10  # util.intersectionAndUnion callers add 1e-10 to every denominator.


def confusion_matrix(
  pred: jax.Array,
  target: jax.Array,
  num_classes: int,
  ignore_label: int = 255,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Counts (ground truth, prediction) pairs of the pixels that are not ignored.

  Pixels whose target is ignore_label (or outside [0, num_classes)) or whose mask is False
  are left out, as util.intersectionAndUnion does with ignore_index.

  Args:
    pred: int predicted classes, any shape (e.g. [B, H, W]).
    target: int ground-truth classes, the same shape.
    num_classes: K.
    ignore_label: target value to skip.
    mask: optional bool, broadcastable to target (e.g. [B, 1, 1] for padded examples).

  Returns:
    int32 [K, K] counts, rows ground truth, columns prediction.
  """
  pred = jnp.asarray(pred).astype(jnp.int32)
  target = jnp.asarray(target).astype(jnp.int32)
  valid = (target != ignore_label) & (target >= 0) & (target < num_classes)
  if mask is not None:
    valid = valid & jnp.broadcast_to(mask, target.shape)
  # A prediction outside [0, K) cannot happen with argmax over K logits; clip for safety.
  pred = jnp.clip(pred, 0, num_classes - 1)
  index = jnp.where(valid, target * num_classes + pred, num_classes * num_classes)
  # One extra bin collects every skipped pixel; a scatter-add is linear in pixels and
  # lowers well on CPU, GPU and TPU (a one-hot matmul would be O(pixels * K^2)).
  counts = jnp.zeros(num_classes * num_classes + 1, jnp.int32).at[index.reshape(-1)].add(1)
  return counts[:-1].reshape(num_classes, num_classes)


def intersection_union_target(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-class (intersection, union, target) pixel counts of a [K, K] confusion matrix.

  Args:
    confusion: [K, K] counts, rows ground truth, columns prediction.

  Returns:
    Three float64 [K] arrays, as util.intersectionAndUnion returns them.
  """
  confusion = np.asarray(confusion, np.float64)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f'confusion must be a square [K, K] matrix, got shape {confusion.shape}.')
  intersection = np.diag(confusion)
  target = confusion.sum(axis=1)
  union = target + confusion.sum(axis=0) - intersection
  return intersection, union, target


def compute_metrics(confusion: np.ndarray, protocol: str = 'official') -> dict[str, Any]:
  """mIoU, mAcc and allAcc of a summed confusion matrix.

  Args:
    confusion: [K, K] counts summed over the split, rows ground truth, columns prediction.
    protocol: 'official' (tool/test.py: mean over all K classes, absent classes count 0)
      or 'mmseg' (mmsegmentation: classes with zero union, resp. zero target pixels, are
      left out of the mean; their per-class value is NaN).

  Returns:
    {'mIoU', 'mAcc', 'allAcc': float, 'iou', 'acc': float64 [K]}.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f'Unknown metrics protocol {protocol!r}; expected one of {PROTOCOLS}.')
  intersection, union, target = intersection_union_target(confusion)
  all_acc = float(intersection.sum() / (target.sum() + _EPS))
  if protocol == 'official':
    iou = intersection / (union + _EPS)
    acc = intersection / (target + _EPS)
    miou, macc = float(np.mean(iou)), float(np.mean(acc))
  else:
    with np.errstate(invalid='ignore', divide='ignore'):
      iou = np.where(union > 0, intersection / union, np.nan)
      acc = np.where(target > 0, intersection / target, np.nan)
    # A split with no labelled pixel at all has no classes to average: report 0, not NaN.
    miou = float(np.nanmean(iou)) if np.any(union > 0) else 0.0
    macc = float(np.nanmean(acc)) if np.any(target > 0) else 0.0
  return dict(mIoU=miou, mAcc=macc, allAcc=all_acc, iou=iou, acc=acc)
