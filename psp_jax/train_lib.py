"""The training job: train_and_evaluate(config, workdir), readable top to bottom.

Steps: check the config; build the model, the optimiser and the mesh; initialise the
TrainState into its shardings or restore the newest checkpoint of the workdir; then loop
over global batches with one compiled train step, logging, validating (whole image) and
checkpointing as the config says. Resuming continues at the same step, schedule and data
position.
"""

import logging
import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from psp_jax import checkpointing, distributed, metrics, optim, summaries, train_config
from psp_jax import train_state as train_state_lib
from psp_jax import train_step as train_step_lib
from psp_jax.train_state import TrainState

_MAX_DEVICE_PIXELS = 2**31 - 1  # int32 confusion counts are moved to the host before this.


def _pad_batch(batch: dict[str, np.ndarray], multiple: int, ignore_label: int) -> dict:
  """Pads images (with 0, the mean colour) and labels (ignore) at the bottom and right.

  The size is the largest of the batch over all processes (every process must feed the
  same global shape), rounded up to a multiple, so whole-image validation compiles once per
  size bucket, not once per image size.
  """
  size = np.asarray(batch['label'].shape[1:3])
  if jax.process_count() > 1:
    size = np.max(multihost_utils.process_allgather(size), axis=0)
  height, width = (-(-size // multiple) * multiple).tolist()
  _, h, w = batch['label'].shape
  if (h, w) == (height, width):
    return batch
  return dict(
    batch,
    image=np.pad(batch['image'], ((0, 0), (0, height - h), (0, width - w), (0, 0))),
    label=np.pad(
      batch['label'], ((0, 0), (0, height - h), (0, width - w)), constant_values=ignore_label
    ),
  )


def evaluate(
  eval_step: Any,
  variables: dict[str, Any],
  config: ml_collections.ConfigDict,
  mesh: Mesh,
) -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
  """Whole-image, single-scale validation on config.data.eval_split.

  A quick proxy during training; psp_jax.evaluate runs the official sliding-window protocol.

  Args:
    eval_step: compiled train_step.make_eval_step.
    variables: {'params', 'batch_stats'}.
    config: the run config (data, eval.batch_size / max_examples / protocol / whole_multiple).
    mesh: the mesh.

  Returns:
    ({'mIoU', 'mAcc', 'allAcc'}, this process's first batch {'image', 'label', 'pred'} or
    None if the split is empty).
  """
  from psp_jax.data import pipeline  # noqa: PLC0415 (TensorFlow is imported lazily)

  pc, pi = jax.process_count(), jax.process_index()
  dataset = pipeline.create_eval_dataset(
    config.data, batch_size=config.eval.batch_size // pc, process_index=pi, process_count=pc
  )
  if config.eval.max_examples > 0:
    dataset = dataset.take(math.ceil(config.eval.max_examples / config.eval.batch_size))
  num_classes, ignore = config.data.num_classes, config.data.ignore_label
  multiple = config.eval.get('whole_multiple', 1)
  total = np.zeros((num_classes, num_classes), np.int64)
  confusion, device_pixels, first = None, 0, None
  for batch in dataset.as_numpy_iterator():
    batch = _pad_batch(batch, multiple, ignore)
    pixels = batch['label'].size * pc
    if confusion is not None and device_pixels + pixels > _MAX_DEVICE_PIXELS:
      total += np.asarray(confusion).astype(np.int64)
      confusion, device_pixels = None, 0
    inputs = {k: batch[k] for k in ('image', 'label', 'mask')}
    batch_confusion, pred = eval_step(variables, distributed_batch(inputs, mesh))
    confusion = batch_confusion if confusion is None else confusion + batch_confusion
    device_pixels += pixels
    if first is None:
      first = dict(image=batch['image'], label=batch['label'], pred=distributed.local_rows(pred))
  if confusion is not None:
    total += np.asarray(confusion).astype(np.int64)
  result = metrics.compute_metrics(total, protocol=config.eval.protocol)
  return {k: result[k] for k in ('mIoU', 'mAcc', 'allAcc')}, first


def distributed_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's numpy batch as global arrays split on 'data' (pipeline.to_global)."""
  from psp_jax.data import pipeline  # noqa: PLC0415

  return pipeline.to_global(batch, mesh, distributed.DATA_AXIS)


def load_init_checkpoint(state: TrainState, path: str) -> TrainState:
  """Copies every matching-shape weight of a checkpoint (e.g. an ImageNet backbone) in.

  Leaves are matched by their path in {'params', 'batch_stats'}; those whose shape differs
  (a classifier of another data set) or that the checkpoint lacks keep their fresh values.
  """
  from flax import traverse_util  # noqa: PLC0415

  from psp_jax import checkpoint_io  # noqa: PLC0415 (written by the conversion tooling)

  loaded, _ = checkpoint_io.load_variables(path)
  loaded = traverse_util.flatten_dict(dict(loaded))
  copied, skipped = 0, []

  def replace(tree: Any, collection: str) -> Any:
    nonlocal copied
    flat = traverse_util.flatten_dict(tree)
    for key, value in flat.items():
      new = loaded.get((collection, *key))
      if new is None:
        continue
      if tuple(new.shape) != tuple(value.shape):
        skipped.append('/'.join((collection, *key)))
        continue
      flat[key] = jax.device_put(np.asarray(new, value.dtype), value.sharding)
      copied += 1
    return traverse_util.unflatten_dict(flat)

  state = state.replace(
    params=replace(state.params, 'params'), batch_stats=replace(state.batch_stats, 'batch_stats')
  )
  if not copied:
    raise ValueError(f'config.init_checkpoint={path} has no weight that fits this model.')
  logging.info('Initialised %d arrays from %s; kept fresh: %s', copied, path, skipped or 'none')
  return state


def _initial_state(config, workdir, model, tx, mesh, model_config):
  """(state, shardings, checkpoints): restored from the workdir, or fresh."""
  crop = train_config.crop_pair(config.data.crop_size)
  image_shape = (1, *crop, 3)  # Parameters do not depend on the batch or image size.
  init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
  checkpoints = checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints)
  step = checkpoints.latest_step()
  if step is None:
    started = time.perf_counter()
    state, shardings = train_state_lib.create_train_state(model, tx, init_key, image_shape, mesh)
    logging.info('Initialised the model in %.1f s.', time.perf_counter() - started)
    if config.get('init_checkpoint'):
      state = load_init_checkpoint(state, config.init_checkpoint)
    return state, shardings, checkpoints
  saved = checkpoints.model_config(step)
  # The compute dtype may change between runs (e.g. resumed on TPU): the weights do not.
  if {k: v for k, v in saved.items() if k != 'dtype'} != {
    k: v for k, v in model_config.items() if k != 'dtype'
  }:
    raise ValueError(
      f'{workdir} holds checkpoints of another model ({saved}), not {model_config}: use a new '
      '--workdir or the config that wrote it.'
    )
  target = train_state_lib.abstract_state(model, tx, init_key, image_shape, mesh)
  state = checkpoints.restore(target, step)
  logging.info('Resumed from %s at step %d.', workdir, step)
  return state, jax.tree.map(lambda x: x.sharding, target), checkpoints


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> dict[str, Any]:
  """Trains (or resumes training) and validates as the config says.

  Args:
    config: the run config (configs/default.py).
    workdir: where checkpoints, TensorBoard events and the resolved config go.
    stop_at_step: stop (with a checkpoint) after this step instead of the last one, as a
      preempted run would; the schedule still spans the whole run.

  Returns:
    {'step': the last step, 'train': the last logged train scalars, 'val': the last
    validation scalars (empty if none ran), 'state': the final TrainState}.
  """
  train_config.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
  from psp_jax.data import pipeline, sources  # noqa: PLC0415 (TensorFlow is imported lazily)

  platform = jax.devices()[0].platform
  model_config = train_config.model_kwargs(config, platform)
  model = train_state_lib.build_model(model_config)
  num_train = None
  if config.num_train_steps <= 0:
    num_train = sources.num_examples(config.data, config.data.train_split)
  total_steps = train_config.num_train_steps(config, num_train)
  tx, schedule = optim.create_optimizer(config.optim, total_steps)
  mesh = distributed.create_mesh()
  pc, pi = jax.process_count(), jax.process_index()
  logging.info(
    'Training %s on %d devices (%d processes, %s) for %d steps of %d images; model %s.',
    config.data.name,
    jax.device_count(),
    pc,
    platform,
    total_steps,
    config.batch_size,
    model_config,
  )

  state, shardings, checkpoints = _initial_state(config, workdir, model, tx, mesh, model_config)
  start_step = int(jax.device_get(state.step))
  end_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
  summaries.write_config(workdir, config, model_config)
  writer = summaries.create_writer(workdir)

  p_train_step = train_step_lib.compile_train_step(
    train_step_lib.make_train_step(
      model,
      tx,
      schedule,
      aux_weight=config.optim.aux_weight,
      ignore_label=config.data.ignore_label,
      loss_groups=config.optim.loss_groups,
      grad_accum_steps=config.optim.grad_accum_steps,
      mesh=mesh,
    ),
    shardings,
    mesh,
  )
  p_eval_step = train_step_lib.compile_eval_step(
    train_step_lib.make_eval_step(model, config.data.num_classes, config.data.ignore_label), mesh
  )
  dropout_key = jax.device_put(
    jax.random.fold_in(jax.random.PRNGKey(config.seed), 1), distributed.replicated(mesh)
  )
  train_iter = pipeline.create_train_dataset(
    config.data,
    batch_size=config.batch_size // pc,
    seed=config.seed,
    process_index=pi,
    process_count=pc,
    start_step=start_step,
  ).as_numpy_iterator()
  palette = summaries.palette_of(config.data.name, config.data.num_classes)

  progress = summaries.Progress(total_steps, start_step, config.batch_size)
  pending: list[dict[str, jax.Array]] = []
  train_scalars: dict[str, float] = {}
  val_scalars: dict[str, float] = {}
  try:
    for step in range(start_step, end_step):
      batch = distributed_batch(next(train_iter), mesh)
      started = time.perf_counter()
      state, step_metrics = p_train_step(state, batch, dropout_key)
      pending.append(step_metrics)
      done = step + 1
      if step == start_step:
        jax.block_until_ready(step_metrics)
        progress.write(f'First step (compilation included): {time.perf_counter() - started:.1f} s')
        progress.restart_clock(done)
      if done % config.log_every_steps == 0 or done == end_step:
        host = jax.device_get(pending)
        train_scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
        rate = progress.update(done, train_scalars)
        scalars = summaries.scalars_of(train_scalars, 'train')
        if rate is not None:
          scalars['train/images_per_sec'] = rate
        writer.write_scalars(done, scalars)
        pending = []
      else:
        progress.update(done)
      if done % config.eval_every_steps == 0 or done == total_steps:
        started = time.perf_counter()
        val_scalars, first = evaluate(p_eval_step, state.variables, config, mesh)
        writer.write_scalars(done, summaries.scalars_of(val_scalars, 'val'))
        if first is not None and config.num_summary_images > 0:
          panels = summaries.example_panels(
            first['image'],
            first['label'],
            first['pred'],
            palette,
            ignore_label=config.data.ignore_label,
            count=config.num_summary_images,
          )
          writer.write_images(done, {'val/input_truth_prediction': panels})
        best = checkpoints.save_if_best(state, model_config, val_scalars)
        progress.write(
          f'step {done}: val mIoU {val_scalars["mIoU"]:.4f} mAcc {val_scalars["mAcc"]:.4f} '
          f'allAcc {val_scalars["allAcc"]:.4f} ({time.perf_counter() - started:.1f} s)'
          + (' (best so far)' if best else '')
        )
        progress.restart_clock(done)
      if done % config.checkpoint_every_steps == 0 or done == end_step:
        checkpoints.save(state, model_config)
  finally:  # Pending checkpoint writes complete even if a step fails.
    progress.close()
    checkpoints.close()
    writer.flush()
    writer.close()
  return dict(
    step=int(jax.device_get(state.step)), train=train_scalars, val=val_scalars, state=state
  )
