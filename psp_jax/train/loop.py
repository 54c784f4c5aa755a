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

from psp_jax import distributed, metrics
from psp_jax.train import checkpoints as checkpointing
from psp_jax.train import config as train_config
from psp_jax.train import optim, safeguards, summaries
from psp_jax.train import state as train_state_lib
from psp_jax.train import step as train_step_lib
from psp_jax.train.state import TrainState

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
  stop: Any = None,
) -> tuple[dict[str, float], dict[str, np.ndarray] | None] | None:
  """Whole-image, single-scale validation on config.data.eval_split.

  A quick proxy during training; psp_jax.evaluate runs the official sliding-window protocol.

  Args:
    eval_step: compiled train_step.make_eval_step.
    variables: {'params', 'batch_stats'}.
    config: the run config (data, eval.batch_size / max_examples / protocol / whole_multiple).
    mesh: the mesh.
    stop: a function polled between batches; when it returns True validation is abandoned
      (one process only: several must run the same batches).

  Returns:
    ({'mIoU', 'mAcc', 'allAcc'}, this process's first batch {'image', 'label', 'pred'} or
    None if the split is empty), or None if stop cut it short.
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
  for batch in pipeline.numpy_batches(dataset):
    if stop is not None and stop():
      return None
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

  from psp_jax import weights  # noqa: PLC0415 (written by the conversion tooling)

  loaded, _ = weights.load_variables(path)
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


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
  """'key: checkpoint X, config Y' for each model setting that differs (dtype may)."""
  keys = sorted((set(saved) | set(wanted)) - {'dtype'})
  return [
    f'{k}: checkpoint {saved.get(k)!r}, config {wanted.get(k)!r}'
    for k in keys
    if saved.get(k) != wanted.get(k)
  ]


def _initial_state(config, workdir, model, tx, mesh, model_config):
  """(state, shardings, checkpoints): restored from the workdir, or fresh.

  Everything that can refuse the workdir (another model's checkpoints, too little space)
  is checked before anything is compiled or written.
  """
  crop = train_config.crop_pair(config.data.crop_size)
  image_shape = (1, *crop, 3)  # Parameters do not depend on the batch or image size.
  init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
  checkpoints = checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints)
  try:
    step = checkpoints.latest_step()
    # The compute dtype may change between runs (e.g. resumed on TPU): the weights do not.
    differences = [] if step is None else _differences(checkpoints.model_config(step), model_config)
    if differences:
      raise checkpointing.WorkdirError(
        f'{workdir} holds checkpoints of another model ({"; ".join(differences)}): use a new '
        '--workdir, or the config that wrote it. Nothing in it was changed.'
      )
    target = train_state_lib.abstract_state(model, tx, init_key, image_shape, mesh)
    checkpointing.check_free_space(
      workdir, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(target))
    )
  except BaseException:
    checkpoints.close()
    raise
  if step is None:
    started = time.perf_counter()
    state, shardings = train_state_lib.create_train_state(model, tx, init_key, image_shape, mesh)
    logging.info('Initialised the model in %.1f s.', time.perf_counter() - started)
    if config.get('init_checkpoint'):
      state = load_init_checkpoint(state, config.init_checkpoint)
    return state, shardings, checkpoints
  state = checkpoints.restore(target, step)
  logging.info('Resumed from %s at step %d.', workdir, step)
  return state, jax.tree.map(lambda x: x.sharding, target), checkpoints


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> dict[str, Any]:
  """Trains (or resumes training) and validates as the config says.

  SIGTERM or SIGINT (preemption, `kill`, Ctrl-C) stops the run at the next step boundary
  with a checkpoint of that step: rerunning the same command continues from it.

  Args:
    config: the run config (configs/default.py).
    workdir: where checkpoints, TensorBoard events and the resolved config go.
    stop_at_step: stop (with a checkpoint) after this step instead of the last one, as a
      preempted run would; the schedule still spans the whole run.

  Returns:
    {'step': the last step, 'train': the last logged train scalars, 'val': the last
    validation scalars (empty if none ran), 'state': the final TrainState, 'preempted':
    whether a signal stopped the run, 'skipped_steps': steps skipped for a non-finite loss}.

  Raises:
    train_config.ConfigError, checkpointing.WorkdirError: before anything is compiled.
    safeguards.NonFiniteLossError: a step's loss was not finite (unless
      config.optim.skip_nonfinite_steps).
    psp_jax.data.files.BadExampleError: a bad data file (unless
      config.data.skip_bad_examples).
  """
  train_config.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
  checkpointing.check_workdir(workdir)
  with safeguards.StopRequest() as stop:
    logging.info('SIGTERM or Ctrl-C saves a checkpoint after the current step and stops.')
    return _train(config, workdir, stop_at_step, stop)


def _train(config, workdir, stop_at_step, stop: safeguards.StopRequest) -> dict[str, Any]:
  """The body of train_and_evaluate, with the stop request installed."""
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

  step_fn = train_step_lib.train_step_of_config(model, tx, schedule, config, mesh)
  p_train_step = train_step_lib.compile_train_step(
    safeguards.guard_nonfinite(step_fn), shardings, mesh
  )
  p_eval_step = train_step_lib.compile_eval_step(
    train_step_lib.make_eval_step(model, config.data.num_classes, config.data.ignore_label), mesh
  )
  dropout_key = jax.device_put(
    jax.random.fold_in(jax.random.PRNGKey(config.seed), 1), distributed.replicated(mesh)
  )
  train_iter = pipeline.numpy_batches(
    pipeline.create_train_dataset(
      config.data,
      batch_size=config.batch_size // pc,
      seed=config.seed,
      process_index=pi,
      process_count=pc,
      start_step=start_step,
    )
  )
  palette = summaries.palette_of(config.data.name, config.data.num_classes)
  nonfinite = safeguards.NonFiniteSteps(bool(config.optim.get('skip_nonfinite_steps', False)))
  eval_stop = (lambda: stop.requested) if pc == 1 else None

  progress = summaries.Progress(total_steps, start_step, config.batch_size)
  pending: list[dict[str, jax.Array]] = []
  train_scalars: dict[str, float] = {}
  val_scalars: dict[str, float] = {}
  preempted = False
  try:
    for step in range(start_step, end_step):
      batch = distributed_batch(next(train_iter), mesh)
      started = time.perf_counter()
      state, step_metrics = p_train_step(state, batch, dropout_key)
      pending.append(step_metrics)
      done = step + 1
      nonfinite.add(done, step_metrics)
      if step == start_step:
        jax.block_until_ready(step_metrics)
        progress.write(f'First step (compilation included): {time.perf_counter() - started:.1f} s')
        progress.restart_clock(done)
      log_now = done % config.log_every_steps == 0 or done == end_step
      preempted = done < end_step and stop.agreed(sync_point=log_now)
      eval_now = done % config.eval_every_steps == 0 or done == total_steps
      save_now = done % config.checkpoint_every_steps == 0 or done == end_step or preempted
      if log_now or eval_now or save_now:
        # Raises (keeping the checkpoints on disk) before a bad state is logged or saved.
        nonfinite.check(checkpoints.latest_step())
      if log_now:
        train_scalars = safeguards.finite_mean(jax.device_get(pending))
        rate = progress.update(done, train_scalars)
        scalars = summaries.scalars_of(train_scalars, 'train')
        scalars['train/skipped_steps'] = nonfinite.skipped
        if rate is not None:
          scalars['train/images_per_sec'] = rate
        writer.write_scalars(done, scalars)
        pending = []
      else:
        progress.update(done)
      if eval_now and not preempted:
        started = time.perf_counter()
        # The last validation runs whole (a rerun would not repeat it).
        cut = eval_stop if done < end_step else None
        result = evaluate(p_eval_step, state.variables, config, mesh, stop=cut)
        if result is None:  # A signal arrived during validation: save and stop now.
          preempted, save_now = True, True
        else:
          val_scalars, first = result
          _write_validation(writer, done, val_scalars, first, palette, config)
          best = checkpoints.save_if_best(state, model_config, val_scalars)
          progress.write(
            f'step {done}: val mIoU {val_scalars["mIoU"]:.4f} mAcc {val_scalars["mAcc"]:.4f} '
            f'allAcc {val_scalars["allAcc"]:.4f} ({time.perf_counter() - started:.1f} s)'
            + (' (best so far)' if best else '')
          )
          progress.restart_clock(done)
      if save_now:
        checkpoints.save(state, model_config)
      if preempted:
        checkpoints.wait()
        logging.warning(
          'Preempted at step %d (%s): checkpoint saved; rerun the same command to resume.',
          done,
          stop.signal_name or 'a signal to another process',
        )
        break
  finally:  # Pending checkpoint writes complete even if a step fails.
    progress.close()
    checkpoints.close()
    writer.flush()
    writer.close()
  if nonfinite.skipped:
    logging.warning('%d step(s) with a non-finite loss were skipped.', nonfinite.skipped)
  return dict(
    step=int(jax.device_get(state.step)),
    train=train_scalars,
    val=val_scalars,
    state=state,
    preempted=preempted,
    skipped_steps=nonfinite.skipped,
  )


def _write_validation(writer, step, val_scalars, first, palette, config) -> None:
  """TensorBoard scalars and example panels of one validation."""
  writer.write_scalars(step, summaries.scalars_of(val_scalars, 'val'))
  if first is not None and config.num_summary_images > 0:
    panels = summaries.example_panels(
      first['image'],
      first['label'],
      first['pred'],
      palette,
      ignore_label=config.data.ignore_label,
      count=config.num_summary_images,
    )
    writer.write_images(step, {'val/input_truth_prediction': panels})
