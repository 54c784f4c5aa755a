"""The training program of a run config: model, optimiser, state layout and jitted step.

train.py's loop (psp_jax.train.loop) and the TPU pre-flight (psp_jax.train.aot) both build
their step with `build`, so the program the pre-flight compiles is the one
train.py runs by construction: the same model config, optimiser, state shardings, step
function, donation, and the same abstract batch and dropout key.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from psp_jax import distributed
from psp_jax.models import PSPNet, codec
from psp_jax.train import config_checks, optim, safeguards, train_state, train_step
from psp_jax.train.train_state import TrainState

# The dropout key's fold-in of the run seed (the parameters' initial key folds in 0).
DROPOUT_FOLD = 1


@dataclasses.dataclass(frozen=True)
class TrainingProgram:
  """What a run's step is made of (nothing allocated).

  Attributes:
    model_config: codec.of_experiment's settings of the model (what checkpoints record).
    model: the network.
    tx: the optimiser over the run's steps.
    init_key: the parameters' initial key.
    image_shape: [1, H, W, 3], the dummy batch parameters are initialised with.
    state: the abstract TrainState with its shardings (the restore target of a checkpoint).
    step_fn: the pure step (guard_nonfinite of train_step_of_config's).
    mesh: the mesh.
    batch: the abstract global batch {'image', 'label'} split on 'data', as the pipeline
      delivers it (images of data.transfer_dtype).
    key: the abstract dropout key, replicated (distributed.replicated_key's result).
  """

  model_config: dict[str, Any]
  model: PSPNet
  tx: optax.GradientTransformation
  init_key: jax.Array
  image_shape: tuple[int, int, int, int]
  state: TrainState
  step_fn: Callable[..., Any]
  mesh: Mesh
  batch: dict[str, jax.ShapeDtypeStruct]
  key: jax.ShapeDtypeStruct

  @property
  def shardings(self) -> TrainState:
    """The TrainState's NamedShardings."""
    return jax.tree.map(lambda x: x.sharding, self.state)

  @functools.cached_property
  def step(self) -> Callable[..., Any]:
    """The jitted step, (state, batch, dropout key) -> (state, metrics), state donated.

    Made on first use: the loop checks the workdir (free space, its checkpoints) with
    `state` before jax sees the step.
    """
    return train_step.compile_train_step(self.step_fn, self.shardings, self.mesh)


def build(
  config: ml_collections.ConfigDict, mesh: Mesh, platform: str, total_steps: int
) -> TrainingProgram:
  """The step of a run config on a mesh (config_checks.validate it first).

  Args:
    config: the run config.
    mesh: the ('data', 'space') mesh (distributed.create_mesh with config.spatial_partitions).
    platform: the devices' platform ('cpu', 'gpu', 'tpu'): the compute dtype of 'auto'.
    total_steps: optimiser steps of the run (the schedule's length).
  """
  model_config = codec.of_experiment(config, platform)
  model = codec.build_model(model_config, platform)
  tx, schedule = optim.create_optimizer(config.optim, total_steps)
  crop = config_checks.crop_pair(config.data.crop_size)
  image_shape = (1, *crop, 3)  # Parameters do not depend on the batch or image size.
  init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
  state = train_state.abstract_state(model, tx, init_key, image_shape, mesh)
  step_fn = train_step.train_step_of_config(model, tx, schedule, config, mesh)
  sharded = distributed.batch_sharded(mesh)
  size = (config.batch_size, *crop)
  batch = {
    'image': jax.ShapeDtypeStruct((*size, 3), config.data.transfer_dtype, sharding=sharded),
    'label': jax.ShapeDtypeStruct(size, jnp.int32, sharding=sharded),
  }
  key = jax.eval_shape(jax.random.key, 0)
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=distributed.replicated(mesh))
  return TrainingProgram(
    model_config,
    model,
    tx,
    init_key,
    image_shape,
    state,
    safeguards.guard_nonfinite(step_fn),
    mesh,
    batch,
    key,
  )


def dropout_key(mesh: Mesh, seed: int) -> jax.Array:
  """The run's dropout key, replicated on the mesh (the step folds in its step number)."""
  return distributed.replicated_key(mesh, seed, DROPOUT_FOLD)
