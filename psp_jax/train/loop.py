"""The training loop: train(config, workdir, validate=...), readable top to bottom.

Validation is the caller's function (psp_jax.experiment passes psp_jax.inference's
whole-image evaluation); resuming continues at the same step, schedule and data position.
Design: docs/design.md#training
"""

import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from psp_jax import distributed, errors, paths, runtime, weights
from psp_jax.data import classes, pipeline, sources
from psp_jax.models import codec
from psp_jax.train import (
  checkpointing,
  config_checks,
  safeguards,
  storage,
  summaries,
  train_state,
  training,
)
from psp_jax.train.train_state import TrainState


def distributed_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's numpy batch as global arrays split on 'data' (pipeline.to_global)."""
  return pipeline.to_global(batch, mesh, distributed.DATA_AXIS)


def load_init_checkpoint(state: TrainState, path: str) -> TrainState:
  """Copies every matching-shape weight of a checkpoint (e.g. an ImageNet backbone) in.

  Leaves are matched by their path in {'params', 'batch_stats'}; those whose shape differs
  (a classifier of another data set) or that the checkpoint lacks keep their fresh values.
  """
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
    raise errors.InvalidInputError(
      f'config.init_checkpoint={path} has no weight that fits this model.'
    )
  logging.info('Initialised %d arrays from %s; kept fresh: %s', copied, path, skipped or 'none')
  return state


def check_init_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a config.init_checkpoint that does not exist, before the workdir is touched.

  Only for a run that starts fresh: one that resumes (the workdir has checkpoints) never
  reads it, so a path gone since the first start does not stop the resume.
  """
  path = config.init_checkpoint
  if not path or paths.as_path(path).exists():
    return
  if weights.step_numbers(paths.as_path(workdir) / weights.LATEST_DIR):
    return
  raise errors.NotFoundError(
    f'config.init_checkpoint={path}: no such file or directory. Pass the path of a .pth '
    '(e.g. resnet50_v2.pth), a weights directory (psp_jax.convert) or a training workdir; '
    'nothing was written.'
  )


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
  """'key: checkpoint X, config Y' for each model setting that differs (dtype may); a key
  one of them lacks (written before it existed) has PSPNet's default."""
  keys = sorted((set(saved) | set(wanted)) - {'dtype'})
  saved, wanted = {**codec.defaults(), **saved}, {**codec.defaults(), **wanted}
  return [
    f'{k}: checkpoint {saved.get(k)!r}, config {wanted.get(k)!r}'
    for k in keys
    if saved.get(k) != wanted.get(k)
  ]


def _initial_state(config, workdir, program: training.TrainingProgram, total_steps: int):
  """(state, checkpoints): restored from the workdir, or fresh.

  Everything that can refuse the workdir (another model's checkpoints, too little space,
  only damaged checkpoints) is checked before anything is compiled; the only write before
  that moves a damaged checkpoint aside (Checkpoints.restore_newest), to resume from the
  one before it.
  """
  checkpoints = checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints)

  def same_model(step: int, saved: dict[str, Any]) -> None:
    # The compute dtype may change between runs (e.g. resumed on TPU): the weights do not.
    differences = _differences(saved, program.model_config)
    if differences:
      raise storage.WorkdirError(
        f'{workdir} holds checkpoints of another model ({"; ".join(differences)}): use a new '
        '--workdir, or the config that wrote it. Nothing in it was changed.'
      )

  target = program.state
  try:
    events = summaries.events_bytes(config, total_steps)
    need, how = storage.space_needed(
      workdir,
      storage.nbytes(target),
      storage.nbytes(target.variables),
      config.keep_checkpoints,
      events,
    )
    storage.check_free_space(workdir, need, how)
    state = checkpoints.restore_newest(target, same_model)
  except BaseException:
    checkpoints.close()
    raise
  if state is None:
    started = time.perf_counter()
    state, _ = train_state.create_train_state(
      program.model, program.tx, program.init_key, program.image_shape, program.mesh
    )
    logging.info('Initialised the model in %.1f s.', time.perf_counter() - started)
    if config.init_checkpoint:
      state = load_init_checkpoint(state, config.init_checkpoint)
    return state, checkpoints
  logging.info('Resumed from %s at step %d.', workdir, int(jax.device_get(state.step)))
  return state, checkpoints


Validate = Callable[[Any, Callable[[], bool] | None], Any]


def train(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  validate: Validate,
  stop_at_step: int | None = None,
) -> dict[str, Any]:
  """Trains (or resumes training) and validates as the config says.

  psp_jax.experiment.train_and_evaluate calls this with the whole-image evaluation of
  psp_jax.inference (this room does not import that one; the caller joins them).

  SIGTERM or SIGINT (preemption, `kill`, Ctrl-C) stops the run at the next step boundary
  with a checkpoint of that step: rerunning the same command continues from it.

  Args:
    config: the run config (configs/default.py).
    workdir: where checkpoints, TensorBoard events and the resolved config go.
    validate: (variables, stop) -> an Evaluation-like result with `.results` ({'mIoU',
      'mAcc', 'allAcc', ...}) and `.examples` (dicts of 'image', 'label', 'pred'), or None
      when `stop()` became True during it.
    stop_at_step: stop (with a checkpoint) after this step instead of the last one, as a
      preempted run would; the schedule still spans the whole run.

  Returns:
    {'step': the last step, 'train': the last logged train scalars, 'val': the last
    validation scalars (empty if none ran), 'state': the final TrainState, 'preempted':
    whether a signal stopped the run, 'skipped_steps': steps skipped for a non-finite loss}.

  Raises:
    config_checks.ConfigError, storage.WorkdirError: before anything is compiled.
    safeguards.NonFiniteLossError: a step's loss was not finite (unless
      config.optim.skip_nonfinite_steps).
    psp_jax.data.files.BadExampleError: a bad data file (unless
      config.data.skip_bad_examples).
  """
  config_checks.validate(config, device_count=jax.device_count(), process_count=jax.process_count())
  pipeline.train_augmenter(config.data)  # The data pipeline's keys, before anything is written.
  # The files the run reads, before anything is written: the data (list files, folders,
  # a prepared data set; the synthetic one is prepared here) and the init checkpoint.
  runtime.setup_tensorflow()
  sources.check_available(config.data, (config.data.train_split, config.data.eval_split))
  check_init_checkpoint(config, workdir)
  storage.check_workdir(workdir)
  with safeguards.StopRequest() as stop:
    logging.info('SIGTERM or Ctrl-C saves a checkpoint after the current step and stops.')
    platform = jax.devices()[0].platform
    num_train = None
    if config.num_train_steps <= 0:
      num_train = sources.num_examples(config.data, config.data.train_split)
    total_steps = config_checks.num_train_steps(config, num_train)
    mesh = distributed.create_mesh(space=config.spatial_partitions)
    program = training.build(config, mesh, platform, total_steps)
    model_config = program.model_config
    pc = jax.process_count()
    part, parts = distributed.batch_part(mesh)
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

    state, checkpoints = _initial_state(config, workdir, program, total_steps)
    start_step = int(jax.device_get(state.step))
    end_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
    summaries.write_config(workdir, config, model_config)
    writer = summaries.create_writer(workdir)

    p_train_step = program.step
    dropout_key = training.dropout_key(mesh, config.seed)
    train_iter = pipeline.numpy_batches(
      pipeline.create_train_dataset(
        config.data,
        batch_size=config.batch_size,
        seed=config.seed,
        process_index=part,
        process_count=parts,
        start_step=start_step,
      )
    )
    palette = classes.palette(config.data.name, config.data.num_classes)
    nonfinite = safeguards.NonFiniteSteps(bool(config.optim.skip_nonfinite_steps))
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
        if step == start_step:  # Compiled before the processes meet: see distributed.meet.
          p_train_step = p_train_step.lower(state, batch, dropout_key).compile()
          distributed.meet('train step compiled')
        state, step_metrics = p_train_step(state, batch, dropout_key)
        pending.append(step_metrics)
        done = step + 1
        nonfinite.add(done, step_metrics)
        if step == start_step:
          jax.block_until_ready(step_metrics)
          progress.write(
            f'First step (compilation included): {time.perf_counter() - started:.1f} s'
          )
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
          result = validate(state.variables, cut)
          if result is None:  # A signal arrived during validation: save and stop now.
            preempted, save_now = True, True
          else:
            val_scalars = {k: result.results[k] for k in ('mIoU', 'mAcc', 'allAcc')}
            _write_validation(writer, done, val_scalars, result.examples, palette, config)
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


def _write_validation(writer, step, val_scalars, examples, palette, config) -> None:
  """TensorBoard scalars and example panels of one validation."""
  writer.write_scalars(step, summaries.scalars_of(val_scalars, 'val'))
  if examples and config.num_summary_images > 0:
    panels = summaries.example_panels(examples, palette, ignore_label=config.data.ignore_label)
    writer.write_images(step, {'val/input_truth_prediction': panels})
