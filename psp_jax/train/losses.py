"""Training losses: softmax cross-entropy that skips the ignore label, and pixel accuracy."""

import jax
import jax.numpy as jnp
import optax

# What cross_entropy divides a group's summed loss by (config.optim.loss_normalization):
# 'labelled': its labelled pixels (torch.nn.CrossEntropyLoss(ignore_index=255), the original);
# 'all': all its pixels, ignored and padded ones included as zeros (mmsegmentation's
# CrossEntropyLoss with its default avg_non_ignore=False, which every PSPNet config keeps).
NORMALIZATIONS = ('labelled', 'all')


def cross_entropy_sums(
  logits: jax.Array, labels: jax.Array, ignore_label: int = 255
) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy and count of the labelled pixels of each example.

  Args:
    logits: [B, H, W, K] (any float dtype; computed in float32).
    labels: int [B, H, W]; ignore_label (or any value outside [0, K)) is skipped.
    ignore_label: label value that contributes nothing.

  Returns:
    (loss_sum float32 [B], count float32 [B]).
  """
  num_classes = logits.shape[-1]
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  safe = jnp.where(valid, labels, 0)
  # Log-softmax in float32 even under bfloat16 compute: the loss and its gradient need it.
  per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  per_pixel = jnp.where(valid, per_pixel, 0.0)
  axes = tuple(range(1, labels.ndim))
  return per_pixel.sum(axes), valid.astype(jnp.float32).sum(axes)


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
    float32 scalar.
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
  correct = (jnp.argmax(logits, axis=-1) == labels) & valid
  return correct.sum().astype(jnp.float32) / jnp.maximum(valid.sum(), 1).astype(jnp.float32)
