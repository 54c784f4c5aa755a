"""The optimiser of hszhao/semseg: SGD with torch semantics, poly schedule, 10x head rate."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

# tool/train.py puts ppm, cls and aux ("modules_new") in parameter groups at 10x base_lr
# and layer0..layer4 ("modules_ori") at base_lr.
HEAD_MODULES = ('ppm', 'cls', 'aux')


def poly_schedule(
  base_lr: float,
  num_steps: int,
  power: float = 0.9,
  warmup_steps: int = 0,
  min_lr: float = 0.0,
) -> Callable[[jax.Array], jax.Array]:
  """lr(step) = (base_lr - min_lr) * (1 - step / num_steps) ** power + min_lr, from step 0.

  util.poly_learning_rate, as tool/train.py uses it: the first iteration runs at base_lr
  (the groups' initial lr), and after iteration i (0-based) the lr becomes
  poly(i + 1), so iteration i runs at poly(i); the last one at base_lr * (1/N) ** power.
  With warmup_steps = W > 0 (not in the original) the rate is further multiplied by
  min(1, (step + 1) / W): linear from base/W to the poly value.

  min_lr > 0 is mmsegmentation's schedule (mmcv's PolyLrUpdaterHook with min_lr, by
  iteration, which trained the mmseg zoo; mmengine's PolyLR with eta_min divides by
  num_steps - 1 instead and reaches min_lr on the last step: a 1 / num_steps difference).

  Args:
    base_lr: rate at step 0.
    num_steps: max_iter, the number of optimiser steps of the run.
    power: poly exponent.
    warmup_steps: length of the linear warm-up, 0 for none.
    min_lr: the rate the poly decay ends at (0 in the original).

  Returns:
    A function of the (int) optimiser step giving a float32 scalar.
  """
  if num_steps < 1:
    raise ValueError(f'poly schedule needs num_steps >= 1, got {num_steps}.')

  def schedule(step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    lr = (base_lr - min_lr) * jnp.clip(1.0 - step / num_steps, 0.0, 1.0) ** power + min_lr
    if warmup_steps > 0:
      lr = lr * jnp.minimum(1.0, (step + 1.0) / warmup_steps)
    return lr

  return schedule


def param_labels(params: Any) -> Any:
  """'head' for every leaf under ppm, cls or aux, 'backbone' for the rest (same tree)."""

  def label(path, _):
    top = path[0].key if path and hasattr(path[0], 'key') else None
    return 'head' if top in HEAD_MODULES else 'backbone'

  return jax.tree_util.tree_map_with_path(label, params)


def _decay_and_momentum(momentum: float, weight_decay: float) -> list:
  """torch.optim.SGD's gradient transform before the lr: coupled decay, then momentum.

  Both are present even at 0, so the optimiser state has one structure whatever the values
  (a checkpoint restores after either is changed).
  """
  return [
    optax.add_decayed_weights(weight_decay),  # d_p = d_p.add(p, alpha=weight_decay)
    optax.trace(decay=momentum, nesterov=False),  # buf.mul_(momentum).add_(d_p)
  ]


def sgd_torch(
  learning_rate: float | Callable[[jax.Array], jax.Array],
  momentum: float = 0.9,
  weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """torch.optim.SGD(lr, momentum, weight_decay) with dampening 0 and nesterov False.

  torch's step is: d = g + wd * p; buf = momentum * buf + d (buf = d at the first step);
  p -= lr * buf. The lr multiplies the momentum buffer *after* accumulation, so buf holds
  unscaled gradients and a per-step lr change acts at once; optax.trace followed by
  scale_by_learning_rate is exactly that (optax.sgd's own order), with the decay added first
  as torch's coupled L2 term on every parameter, BatchNorm and biases included.

  Args:
    learning_rate: constant or schedule of the step.
    momentum: momentum.
    weight_decay: coupled L2 coefficient.

  Returns:
    The optax transformation.
  """
  parts = _decay_and_momentum(momentum, weight_decay)
  return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


def create_optimizer(
  optim_config: Any, num_train_steps: int
) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
  """The training optimiser of config.optim, and its base learning-rate schedule.

  Decay and momentum are shared (the momentum buffer holds unscaled gradients in torch, so
  a per-group lr does not change it); only the final lr scaling differs: the backbone at
  the schedule, the head (ppm, cls, aux) at head_lr_mult times it.

  Args:
    optim_config: config.optim (base_lr, momentum, weight_decay, power, head_lr_mult,
      warmup_steps, min_lr).
    num_train_steps: optimiser steps of the whole run (max_iter).

  Returns:
    (optax transformation over the params tree, schedule(step) -> backbone lr).
  """
  schedule = poly_schedule(
    float(optim_config.base_lr),
    int(num_train_steps),
    float(optim_config.power),
    int(optim_config.warmup_steps),
    float(optim_config.min_lr),
  )
  mult = float(optim_config.head_lr_mult)

  def head_schedule(step: jax.Array) -> jax.Array:
    return mult * schedule(step)

  lr = optax.multi_transform(
    {
      'backbone': optax.scale_by_learning_rate(schedule),
      'head': optax.scale_by_learning_rate(head_schedule),
    },
    param_labels,
  )
  parts = _decay_and_momentum(float(optim_config.momentum), float(optim_config.weight_decay))
  return optax.chain(*parts, lr), schedule
