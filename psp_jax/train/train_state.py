"""All mutable training state in one pytree, and its creation straight into its shardings."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from psp_jax import distributed
from psp_jax.models import PSPNet


@flax.struct.dataclass
class TrainState:
  """Parameters, BatchNorm statistics, optimiser state and the optimiser step.

  Attributes:
    step: int32 scalar, optimiser steps taken (the poly schedule's iteration).
    params: the model's 'params' collection (float32).
    batch_stats: the model's 'batch_stats' collection (running mean and var).
    opt_state: the optax state of params.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict[str, Any]:
    """{'params', 'batch_stats'}: what model.apply and psp_jax.weights need."""
    return {'params': self.params, 'batch_stats': self.batch_stats}


def init_fn(model: PSPNet, tx: optax.GradientTransformation, image_shape: tuple[int, ...]):
  """A function of a PRNG key that builds a fresh TrainState (to be jitted).

  PSPNet creates the aux head's parameters at init whatever `train` says, so the eval-mode
  init gives every parameter and leaves the BatchNorm statistics at their initial values.

  Args:
    model: the network.
    tx: the optimiser.
    image_shape: [b, H, W, 3] of a dummy batch.
  """

  def init(key: jax.Array) -> TrainState:
    images = jnp.zeros(image_shape, jnp.float32)
    variables = model.init({'params': key}, images, train=False)
    params = variables['params']
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get('batch_stats', {}),
      opt_state=tx.init(params),
    )

  return init


def state_shardings(abstract_state: TrainState, mesh: Mesh) -> TrainState:
  """Shardings of the TrainState: everything replicated (data parallelism).

  A rule keyed on the path (e.g. sharding large kernels over the mesh, FSDP) would go here.
  """
  return jax.tree.map(lambda _: distributed.replicated(mesh), abstract_state)


def create_train_state(
  model: PSPNet,
  tx: optax.GradientTransformation,
  key: jax.Array,
  image_shape: tuple[int, ...],
  mesh: Mesh,
) -> tuple[TrainState, TrainState]:
  """A fresh TrainState initialised directly into its shardings.

  jax.eval_shape gives the structure without allocating; jit with out_shardings then
  creates each array where it lives, never on one device first.

  Returns:
    (state, shardings), shardings a TrainState of NamedSharding.
  """
  init = init_fn(model, tx, image_shape)
  abstract = jax.eval_shape(init, key)
  shardings = state_shardings(abstract, mesh)
  state = jax.jit(init, in_shardings=distributed.replicated(mesh), out_shardings=shardings)(key)
  return state, shardings


def abstract_state(
  model: PSPNet,
  tx: optax.GradientTransformation,
  key: jax.Array,
  image_shape: tuple[int, ...],
  mesh: Mesh,
) -> TrainState:
  """TrainState of jax.ShapeDtypeStruct with shardings: the restore target of a checkpoint."""
  abstract = jax.eval_shape(init_fn(model, tx, image_shape), key)
  shardings = state_shardings(abstract, mesh)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
  )
