"""The pure training and evaluation steps, and their sharded compilation.

`train_step(state, batch, rng) -> (state, metrics)` is one optimiser step on a global batch
(gradient accumulation included), compiled once with jax.jit over the mesh: the batch split
on 'data', state and key replicated, the old state donated. BatchNorm statistics are over
the global batch because the computation is written for the global array (SyncBN).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from psp_jax import distributed
from psp_jax.data import normalization
from psp_jax.models import PSPNet, ops
from psp_jax.train import losses
from psp_jax.train.train_state import TrainState

Batch = dict[str, jax.Array]

_MEAN = np.asarray(normalization.MEAN_RGB, np.float32)
_STD = np.asarray(normalization.STD_RGB, np.float32)


def normalised_images(images: jax.Array) -> jax.Array:
  """A batch's images as the model takes them: float32 ones are normalised already; uint8
  ones (0..255) are normalised here, (x - mean) / std in float32 as transforms.normalize
  does on the host, to within one float32 ulp (XLA turns a division by a per-channel vector
  into a product with its reciprocal)."""
  if images.dtype != jnp.uint8:
    return images
  return (images.astype(jnp.float32) - _MEAN) / _STD


TrainStep = Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def make_train_step(
  model: PSPNet,
  tx: optax.GradientTransformation,
  schedule: Callable[[jax.Array], jax.Array],
  *,
  aux_weight: float = 0.4,
  ignore_label: int = 255,
  loss_groups: int = 1,
  loss_normalization: str = 'labelled',
  grad_accum_steps: int = 1,
  mesh: Mesh | None = None,
) -> TrainStep:
  """The pure train step of the PSPNet recipe.

  loss = CE(main) + aux_weight * CE(aux) with the ignore label skipped (tool/train.py,
  PSPNet.forward in model/pspnet.py). With grad_accum_steps = A the batch is cut into A
  micro-batches (example i goes to micro-batch i % A, so every micro-batch stays split over
  all devices); their gradients are averaged, BatchNorm statistics are updated after each
  in turn, and one optimiser step is taken.

  Args:
    model: the network.
    tx: optimiser (psp_jax.train.optim.create_optimizer).
    schedule: base learning rate of the step, for the metrics.
    aux_weight: weight of the auxiliary loss.
    ignore_label: label skipped by the loss.
    loss_groups: see psp_jax.train.losses.cross_entropy (per micro-batch).
    loss_normalization: 'labelled' (the original) or 'all' (mmseg); the same for both heads,
      see psp_jax.train.losses.cross_entropy.
    grad_accum_steps: micro-batches per optimiser step.
    mesh: the mesh, to keep micro-batches sharded on 'data' (None: no constraint).

  Returns:
    train_step(state, batch, rng) -> (new state, metrics); batch {'image': float32
    [B, H, W, 3] normalised or uint8 of 0..255 (normalised_images), 'label': int [B, H, W]};
    metrics are float32 scalars.
  """

  def loss_fn(params, batch_stats, images, labels, key):
    (logits, aux_logits), updates = model.apply(
      {'params': params, 'batch_stats': batch_stats},
      images,
      train=True,
      rngs={'dropout': key},
      mutable=['batch_stats'],
    )
    main_loss = losses.cross_entropy(logits, labels, ignore_label, loss_groups, loss_normalization)
    aux_loss = losses.cross_entropy(
      aux_logits, labels, ignore_label, loss_groups, loss_normalization
    )
    loss = main_loss + aux_weight * aux_loss
    out = dict(
      loss=loss,
      main_loss=main_loss,
      aux_loss=aux_loss,
      accuracy=losses.pixel_accuracy(logits, labels, ignore_label),
    )
    return loss, (updates['batch_stats'], out)

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def split(x: jax.Array) -> jax.Array:
    """[B, ...] -> [A, B / A, ...] with micro-batch a = examples a, a + A, a + 2A, ..."""
    x = x.reshape(x.shape[0] // grad_accum_steps, grad_accum_steps, *x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    if mesh is not None:
      spec = PartitionSpec(None, distributed.DATA_AXIS, distributed.SPACE_AXIS)
      x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return x

  height_split = mesh is not None and mesh.shape.get(distributed.SPACE_AXIS, 1) > 1

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    with ops.height_split(height_split):  # Traced under it: pooling order for split images.
      return _train_step(state, batch, rng)

  def _train_step(state: TrainState, batch: Batch, rng: jax.Array):
    # One key for the run, folded with the step: the same masks on any number of devices.
    key = jax.random.fold_in(rng, state.step)
    images, labels = normalised_images(batch['image']), batch['label']
    if mesh is not None:  # Each image's rows over 'space' (a local slice: fed whole).
      images, labels = jax.lax.with_sharding_constraint(
        (images, labels), distributed.image_sharded(mesh)
      )
    if grad_accum_steps == 1:
      grads, (batch_stats, out) = grad_fn(state.params, state.batch_stats, images, labels, key)
    else:

      def micro_step(carry, xs):
        grads_sum, batch_stats = carry
        index, micro_images, micro_labels = xs
        grads, (batch_stats, out) = grad_fn(
          state.params, batch_stats, micro_images, micro_labels, jax.random.fold_in(key, index)
        )
        return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), out

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      xs = (jnp.arange(grad_accum_steps), split(images), split(labels))
      (grads, batch_stats), outs = jax.lax.scan(micro_step, (zeros, state.batch_stats), xs)
      grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
      out = jax.tree.map(jnp.mean, outs)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out['lr'] = schedule(state.step)
    out['grad_norm'] = optax.tree.norm(grads)
    new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, out

  return train_step


def train_step_of_config(
  model: PSPNet,
  tx: optax.GradientTransformation,
  schedule: Callable[[jax.Array], jax.Array],
  config: Any,
  mesh: Mesh | None = None,
) -> TrainStep:
  """make_train_step with a run config's settings (config.optim.*, config.data.ignore_label)."""
  return make_train_step(
    model,
    tx,
    schedule,
    aux_weight=config.optim.aux_weight,
    ignore_label=config.data.ignore_label,
    loss_groups=config.optim.loss_groups,
    loss_normalization=config.optim.loss_normalization,
    grad_accum_steps=config.optim.grad_accum_steps,
    mesh=mesh,
  )


def compile_train_step(
  train_step: TrainStep, state_shardings: TrainState, mesh: Mesh
) -> Callable[..., Any]:
  """jax.jit of train_step with explicit shardings, donating the old state.

  Args:
    train_step: from make_train_step.
    state_shardings: TrainState of NamedSharding (train_state.create_train_state).
    mesh: the mesh.
  """
  replicated = distributed.replicated(mesh)
  return jax.jit(
    train_step,
    in_shardings=(state_shardings, distributed.batch_sharded(mesh), replicated),
    out_shardings=(state_shardings, replicated),
    donate_argnums=(0,),
  )
