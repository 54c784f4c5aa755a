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

  With groups = G > 1 the batch is cut into G equal consecutive slices, each slice's loss
  is its own mean over its labelled pixels, and the G means are averaged. That is what
  hszhao/semseg's multi-GPU training optimises (tool/train.py: each of the 8 GPUs computes
  CrossEntropyLoss on its 2 images, and DistributedDataParallel averages the gradients), so
  groups=8 with batch 16 reproduces it on any number of devices. groups=1 is the mean over
  all labelled pixels of the batch.

  A slice without a single labelled pixel contributes 0 where torch would return NaN (0/0):
  one unlucky crop of pure ignore pixels should not poison the parameters.

  normalization='all' divides each slice's sum by all its pixels instead, ignored ones
  included (mmseg: loss.sum() / label.numel() in mmseg/models/losses/cross_entropy_loss.py,
  called by BaseDecodeHead.loss_by_feat for the decode and auxiliary heads alike). Ignored
  pixels still add nothing to the sum, so the loss and its gradient shrink with the fraction
  of ignored pixels. As every slice has the same number of pixels, the groups then do not
  change the value: mmseg's per-GPU means averaged by DDP are the mean over the batch.

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
