"""The training job: psp_jax.train's loop validated by psp_jax.inference's evaluation.

  result = train_and_evaluate(config, workdir)   # what train.py runs

The two rooms never import each other; this module joins them, so in-training validation
is the very code `python -m psp_jax.evaluate --config.eval.mode=whole` runs.
"""

from typing import Any

import ml_collections

from psp_jax import runtime
from psp_jax.inference import evaluation
from psp_jax.train import loop


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> dict[str, Any]:
  """Trains (or resumes) with whole-image validation; see psp_jax.train.loop.train.

  Args:
    config: the run config (configs/default.py).
    workdir: where checkpoints, TensorBoard events and the resolved config go.
    stop_at_step: stop (with a checkpoint) after this step, as a preempted run would.

  Returns:
    loop.train's dict: step, train and val scalars, the final state, preempted,
    skipped_steps.
  """
  runtime.setup()
  return loop.train(
    config, workdir, validate=evaluation.validator(config), stop_at_step=stop_at_step
  )
