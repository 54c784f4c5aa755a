"""Training losses: softmax cross-entropy that skips the ignore label, and pixel accuracy."""

import jax
import jax.numpy as jnp

# What cross_entropy divides a group's summed loss by (config.optim.loss_normalization):
# 'labelled': its labelled pixels (torch.nn.CrossEntropyLoss(ignore_index=255), the original);
# 'all': all its pixels, ignored and padded ones included as zeros (mmsegmentation's
# CrossEntropyLoss with its default avg_non_ignore=False, which every PSPNet config keeps).
NORMALIZATIONS = ('labelled', 'all')


def _one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
  """bool [..., K]: labels[..., None] == k."""
  return labels[..., None] == jnp.arange(num_classes, dtype=labels.dtype)


def cross_entropy_sums(
  logits: jax.Array, labels: jax.Array, ignore_label: int = 255
) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy and count of the labelled pixels of each example.

  Args:
    logits: [B, H, W, K] (any float dtype; computed in float32, or float64 if they are).
    labels: int [B, H, W]; ignore_label (or any value outside [0, K)) is skipped.
    ignore_label: label value that contributes nothing.

  Returns:
    (loss_sum [B], count [B]), float32 (float64 for float64 logits).
  """
  num_classes = logits.shape[-1]
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  safe = jnp.where(valid, labels, 0)
  # Log-softmax in float32 even under bfloat16 compute: the loss and its gradient need it.
  # optax.softmax_cross_entropy_with_integer_labels's numbers (logsumexp minus the label's
  # logit), but the label's logit is picked by a masked sum over the classes, not
  # take_along_axis: XLA fuses that sum with logsumexp's into one read of the logits, where the
  # gather read all of them once more (at [2, 473, 473, 150] float32 a chip, 0.3 GB a head in
  # the TPU step: benchmarks/NOTES.md). Adding zeros is exact: the same numbers bit for bit.
  x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  label_logit = jnp.sum(jnp.where(_one_hot(safe, num_classes), x, 0.0), axis=-1)
  per_pixel = jnp.where(valid, jax.nn.logsumexp(x, axis=-1) - label_logit, 0.0)
  axes = tuple(range(1, labels.ndim))
  return per_pixel.sum(axes), valid.astype(x.dtype).sum(axes)


def cross_entropy(
  logits: jax.Array,
  labels: jax.Array,
  ignore_label: int = 255,
  groups: int = 1,
  normalization: str = 'labelled',
) -> jax.Array:
  """Mean cross-entropy over labelled pixels, as torch.nn.CrossEntropyLoss(ignore_index=255).

  groups = G > 1 averages the means of G equal consecutive slices of the batch, as
  hszhao/semseg's 8-GPU training optimises (tool/train.py, DDP); normalization='all' divides
  each slice's sum by all its pixels, ignored ones included (mmseg's cross_entropy_loss.py).
  A slice with no labelled pixel contributes 0, not torch's NaN.
  Design: docs/design.md#losses

  Args:
    logits: [B, H, W, K].
    labels: int [B, H, W].
    ignore_label: label to skip.
    groups: number of slices; must divide B.
    normalization: one of NORMALIZATIONS.

  Returns:
    float32 scalar (float64 for float64 logits).
  """
  batch = labels.shape[0]
  if batch % groups:
    raise ValueError(f'loss groups ({groups}) must divide the batch ({batch}).')
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'normalization {normalization!r} must be one of {NORMALIZATIONS}.')
  loss_sum, count = cross_entropy_sums(logits, labels, ignore_label)
  loss_sum = loss_sum.reshape(groups, -1).sum(1)
  if normalization == 'all':
    # mmseg adds float32 eps to the divisor (against 0); a pixel count is never 0 here.
    return jnp.mean(loss_sum / float(labels.size // groups))
  count = count.reshape(groups, -1).sum(1)
  return jnp.mean(loss_sum / jnp.maximum(count, 1.0))


def pixel_accuracy(logits: jax.Array, labels: jax.Array, ignore_label: int = 255) -> jax.Array:
  """Fraction of labelled pixels whose argmax is right (float32 scalar); 0 if none.

  Args:
    logits: [B, H, W, K].
    labels: int [B, H, W].
    ignore_label: label to skip.
  """
  num_classes = logits.shape[-1]
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  # Right where the label's logit is the largest: argmax's answer except where the label ties
  # the maximum with a class before it (argmax takes the first; here it counts as right). The
  # label's logit and the maximum are the ones cross_entropy takes (XLA computes each once),
  # so on TPU this reads no [B, H, W, K] tensor of its own; argmax (or a search for the first
  # class at the maximum) was one more read of the logits (benchmarks/NOTES.md).
  x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  label_logit = jnp.sum(jnp.where(_one_hot(jnp.where(valid, labels, 0), num_classes), x, 0.0), -1)
  correct = (label_logit >= jnp.max(x, axis=-1)) & valid
  return correct.sum().astype(jnp.float32) / jnp.maximum(valid.sum(), 1).astype(jnp.float32)
