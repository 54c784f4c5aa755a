"""Evaluation of a checkpoint on a data set split with the official protocol (tool/test.py).

`python -m psp_jax.evaluate` is its command line (mIoU / mAcc / allAcc, a per-class table,
results.{txt,md,json}); in-training validation (`validator`) runs the same `evaluate_model`.
Protocol 'official' averages over all classes, 'mmseg' over those present; each host
evaluates its own part of the split. Design: docs/design.md#evaluation-protocols
"""

import json
import os
import pathlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from psp_jax import distributed, errors, metrics, runtime
from psp_jax.data import classes, pipeline, sources
from psp_jax.inference import segmenter
from psp_jax.inference.sliding_window import InferenceConfig, SlidingWindowInference
from psp_jax.models import codec

# A device's int32 confusion counts are moved to the host before they could overflow.
_INT32_MAX = 2**31 - 1


class Totals(NamedTuple):
  """What one pass over a host's examples adds up.

  Attributes:
    confusion: int64 [K, K], rows ground truth, columns prediction.
    images: examples seen.
    kept: the first examples asked for, each {'image' uint8 [H, W, 3], 'label' [H, W],
      'pred' int32 [H, W]} (TensorBoard's panels).
  """

  confusion: np.ndarray
  images: int
  kept: list[dict[str, np.ndarray]]


def evaluate_examples(
  inference: SlidingWindowInference,
  examples: Iterable[dict[str, np.ndarray]],
  *,
  total: int | None = None,
  progress: bool = True,
  stop: Callable[[], bool] | None = None,
  keep: int = 0,
) -> Totals | None:
  """Confusion matrix of this host's examples.

  Images with one plan key (all of them in slide mode; one size bucket in whole mode) are
  batched one per device; a partial last batch leaves devices idle.

  Args:
    examples: dicts with 'image' uint8 [H, W, 3] and 'label' int [H, W] (255 = ignore).
    total: number of examples, for the progress bar.
    progress: show a progress bar.
    stop: polled between examples; when it returns True the pass is abandoned.
    keep: how many examples to return with their predictions.

  Returns:
    The Totals, or None if `stop` cut the pass short.
  """
  k = inference.num_classes
  host_total = np.zeros((k, k), np.int64)
  confusion = inference.zero_confusion()
  pending: dict[tuple, list[tuple[Any, dict[str, np.ndarray]]]] = {}
  kept: list[dict[str, np.ndarray]] = []
  pixels = 0  # Upper bound of any device's counts since the last move to the host.
  images = 0

  def run(group):
    nonlocal confusion, host_total, pixels
    most = max(plan.height * plan.width for plan, _ in group)
    # Waits for the previous step: at most one step queued while the host plans the next.
    confusion.block_until_ready()
    if pixels + most > _INT32_MAX:
      host_total += np.asarray(confusion).astype(np.int64).sum(0)
      confusion, pixels = inference.zero_confusion(), 0
    plans, labels = zip(*[(plan, ex['label']) for plan, ex in group], strict=True)
    wanted = len(kept) < keep
    preds, confusion = inference.run(plans, labels, confusion, outputs='labels' if wanted else None)
    if wanted:
      kept.extend(dict(ex, pred=pred) for (_, ex), pred in zip(group, preds, strict=True))
    pixels += most

  bar = tqdm(total=total, desc='evaluate', unit='img', disable=not progress)
  for example in examples:
    if stop is not None and stop():
      bar.close()
      return None
    plan = inference.plan(example['image'])
    label = np.asarray(example['label'])
    if label.shape != (plan.height, plan.width):
      raise errors.InvalidInputError(
        f'label {label.shape} and image {example["image"].shape} sizes differ'
      )
    group = pending.setdefault(plan.key, [])
    group.append((plan, dict(image=np.asarray(example['image']), label=label)))
    images += 1
    if len(group) == inference.batch_size:
      run(pending.pop(plan.key))
    bar.update(1)
  for group in pending.values():
    run(group)
  bar.close()
  confusion = host_total + np.asarray(confusion).astype(np.int64).sum(0)
  return Totals(confusion, images, kept[:keep])


def sum_over_hosts(confusion: np.ndarray) -> np.ndarray:
  """Sum of every host's int64 confusion matrix (exact: sent as pairs of int32 words)."""
  if jax.process_count() == 1:
    return confusion
  words = np.ascontiguousarray(confusion.astype(np.int64)).view(np.int32)
  gathered = np.asarray(distributed.allgather(words, 'confusion'))
  return gathered.view(np.int64).reshape(-1, *confusion.shape).sum(0)


def summarize(
  confusion: np.ndarray,
  class_names: Sequence[str],
  *,
  protocol: str = 'official',
  setup: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Metrics of a confusion matrix, per class and averaged, with what produced them."""
  result = metrics.compute_metrics(confusion, protocol=protocol)
  per_class = [
    dict(name=name, iou=_number(iou), acc=_number(acc), pixels=int(gt))
    for name, iou, acc, gt in zip(
      class_names, result['iou'], result['acc'], confusion.sum(1), strict=True
    )
  ]
  return dict(
    mIoU=float(result['mIoU']),
    mAcc=float(result['mAcc']),
    allAcc=float(result['allAcc']),
    protocol=protocol,
    protocol_note=PROTOCOL_NOTES[protocol].format(k=len(class_names)),
    setup=setup or {},
    per_class=per_class,
  )


PROTOCOL_NOTES = {
  'official': 'official (hszhao/semseg tool/test.py): mean over all {k} classes, a class '
  'absent from prediction and ground truth counts 0',
  'mmseg': 'mmseg (mmsegmentation): IoU averaged over the classes with a non-empty union, '
  'accuracy over the classes present in the ground truth',
}


def describe(procedure: InferenceConfig) -> dict[str, Any]:
  """The inference procedure, for the report."""
  out = dict(mode=procedure.mode, resize=procedure.resize)
  if procedure.resize == 'fit':
    out['fit_scale'] = list(procedure.fit_scale)
  else:
    out['base_size'] = procedure.base_size
  out.update(scales=list(procedure.scales), flip=procedure.flip, average=procedure.average)
  if procedure.mode == 'slide':
    out['crop_size'] = list(procedure.crop_size)
    out['stride'] = list(procedure.strides)
    out['clip_windows'] = procedure.clip_windows
  else:
    out['whole_multiple'] = procedure.whole_multiple
  return out


def _number(x: float) -> float | None:
  """None for the NaN of a class the mmseg protocol leaves out (JSON has no NaN)."""
  return None if np.isnan(x) else float(x)


def _pct(x: float | None) -> str:
  return '     -' if x is None else f'{100 * x:6.2f}'


def format_text(results: dict[str, Any]) -> str:
  """Plain-text report: header, the three numbers, the per-class table."""
  setup = ', '.join(f'{k}={v}' for k, v in results['setup'].items())
  width = max([len(c['name']) for c in results['per_class']] + [5])
  lines = [
    f'protocol: {results["protocol_note"]}',
    f'setup: {setup}',
    f'mIoU {_pct(results["mIoU"])}  mAcc {_pct(results["mAcc"])}  allAcc {_pct(results["allAcc"])}',
    '',
    f'{"class":<{width}}     IoU     Acc     pixels',
  ]
  for c in results['per_class']:
    lines.append(f'{c["name"]:<{width}}  {_pct(c["iou"])}  {_pct(c["acc"])}  {c["pixels"]:>9d}')
  return '\n'.join(lines)


def format_markdown(results: dict[str, Any]) -> str:
  """Markdown report with the same content as format_text."""
  setup = ', '.join(f'`{k}={v}`' for k, v in results['setup'].items())
  lines = [
    f'**mIoU {_pct(results["mIoU"])} | mAcc {_pct(results["mAcc"])} | '
    f'allAcc {_pct(results["allAcc"])}**',
    '',
    f'Protocol: {results["protocol_note"]}. Setup: {setup}.',
    '',
    '| class | IoU | Acc | pixels |',
    '|---|---:|---:|---:|',
  ]
  for c in results['per_class']:
    lines.append(f'| {c["name"]} | {_pct(c["iou"])} | {_pct(c["acc"])} | {c["pixels"]} |')
  return '\n'.join(lines) + '\n'


RESULT_FILES = ('results.txt', 'results.md', 'results.json')  # what write_results writes


def write_results(results: dict[str, Any], output_dir: str | os.PathLike) -> None:
  """results.txt, results.md and results.json in output_dir."""
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  text, markdown, data = RESULT_FILES
  (out / text).write_text(format_text(results) + '\n')
  (out / markdown).write_text(format_markdown(results))
  (out / data).write_text(json.dumps(results, indent=2) + '\n')


def _normalise(value: Any) -> Any:
  return list(value) if isinstance(value, tuple | list) else value


def check_model_config(
  config: ml_collections.ConfigDict, model_config: dict[str, Any], checkpoint: Any
) -> None:
  """Warns where config.model differs from the checkpoint (which wins); refuses other classes."""
  for key, value in model_config.items():
    wanted = config.model.get(key)
    if key != 'dtype' and wanted is not None and _normalise(wanted) != _normalise(value):
      logging.warning(
        '%s: model.%s is %s in the checkpoint, %s in the config; using %s',
        checkpoint,
        key,
        value,
        wanted,
        value,
      )
  num_classes = config.data.num_classes
  if int(model_config['num_classes']) != num_classes:
    raise errors.InvalidInputError(
      f'{checkpoint} predicts {model_config["num_classes"]} classes but '
      f'config.data.num_classes is {num_classes}: use the matching --config'
    )


def procedure_of(config: ml_collections.ConfigDict) -> InferenceConfig:
  """The test procedure of config.eval, every eval value checked: what training and evaluate
  call at start-up (windows_per_step: config.eval.batch_size over the devices).

  Raises:
    errors.InvalidInputError: naming the config.eval key (or config.data.crop_size) at fault.
  """
  protocol = config.eval.protocol
  if protocol not in metrics.PROTOCOLS:
    raise errors.InvalidInputError(
      f'config.eval.protocol: must be one of {metrics.PROTOCOLS}, got {protocol!r}.'
    )
  windows = max(1, config.eval.batch_size // jax.device_count())  # Per local device.
  return InferenceConfig.from_config(config, windows_per_step=windows)


class Evaluation(NamedTuple):
  """summarize()'s results of a split and this host's first examples with predictions."""

  results: dict[str, Any]
  examples: list[dict[str, np.ndarray]]


def evaluate_model(
  config: ml_collections.ConfigDict,
  apply_fn: Callable[[Any, jax.Array], jax.Array],
  variables: Any,
  *,
  progress: bool = True,
  stop: Callable[[], bool] | None = None,
  keep: int = 0,
  class_names: Sequence[str] | None = None,
) -> Evaluation | None:
  """Evaluates a model on config.data.eval_split as config.eval says (the one path).

  psp_jax.evaluate (through `evaluate`) and in-training validation (`validator`) both run
  this, so their numbers agree for the same weights and config.

  Args:
    config: the run config (data, eval, model.dtype).
    apply_fn: (variables, images [B, H, W, 3]) -> logits [B, H, W, K].
    variables: {'params', 'batch_stats'} (host or single-device arrays).
    progress: show a progress bar (process 0 only).
    stop: polled between images; True abandons the pass (single process only: several
      must finish together).
    keep: how many of this host's examples to return with predictions.
    class_names: the model's own (a checkpoint's meta); by default config.data.name's.

  Returns:
    The Evaluation, or None if `stop` cut it short.
  """
  runtime.setup_tensorflow()
  num_classes = config.data.num_classes
  procedure = procedure_of(config)
  inference = SlidingWindowInference(
    apply_fn,
    variables,
    num_classes=num_classes,
    procedure=procedure,
    ignore_label=config.data.ignore_label,
  )
  split = config.data.eval_split
  dataset = sources.get_source(
    config.data, split, process_index=jax.process_index(), process_count=jax.process_count()
  )
  total = -(-sources.num_examples(config.data, split) // jax.process_count())
  if config.eval.max_examples > 0:
    per_host = -(-config.eval.max_examples // jax.process_count())
    dataset, total = dataset.take(per_host), min(total, per_host)
  totals = evaluate_examples(
    inference,
    pipeline.numpy_batches(dataset),  # A bad file: files.BadExampleError, named.
    total=total,
    progress=progress and jax.process_index() == 0,
    stop=stop,
    keep=keep,
  )
  if totals is None:
    return None
  confusion = sum_over_hosts(totals.confusion)
  images = int(sum_over_hosts(np.array([totals.images], np.int64))[0])
  names = tuple(class_names) if class_names else classes.names(config.data.name, num_classes)
  setup = dict(data=config.data.name, split=split, images=images, **describe(procedure))
  setup['dtype'] = codec.compute_dtype(config.model.dtype, jax.default_backend()).name
  results = summarize(confusion, names, protocol=config.eval.protocol, setup=setup)
  return Evaluation(results, totals.kept)


def evaluate(
  config: ml_collections.ConfigDict, checkpoint: str | os.PathLike, *, progress: bool = True
) -> dict[str, Any]:
  """Loads the checkpoint, evaluates config.data.eval_split and returns summarize()."""
  procedure_of(config)  # A bad eval value fails now, not after loading the checkpoint.
  # The checkpoint fixes the architecture; the config may only change the compute dtype.
  apply_fn, variables, model_config, meta = segmenter.load(checkpoint, dtype=config.model.dtype)
  check_model_config(config, model_config, checkpoint)
  names = (meta or {}).get('classes')  # an mmseg file's own names (fit num_classes: checked)
  return evaluate_model(config, apply_fn, variables, progress=progress, class_names=names).results


def validator(
  config: ml_collections.ConfigDict,
) -> Callable[[Any, Callable[[], bool] | None], Evaluation | None]:
  """In-training validation: evaluate_model in whole mode on the run's own variables.

  What TensorBoard's val/* shows is what `python -m psp_jax.evaluate
  --config.eval.mode=whole` prints for the checkpoint saved at that step.

  Args:
    config: the run config.

  Returns:
    validate(variables, stop) -> Evaluation or None (stopped), keeping
    config.num_summary_images examples.

  Raises:
    errors.InvalidInputError: naming a config.eval key whose value cannot work.
  """
  whole = ml_collections.ConfigDict(config.to_dict())
  whole.eval.mode = 'whole'
  procedure_of(whole)  # A bad eval value fails before training starts.
  models = []  # Built at the first validation, after the training loop checked the config.

  # One function object for the whole run: the compiled inference steps are cached on it.
  def apply_fn(variables, images):
    return models[0].apply(variables, images, train=False)

  def validate(variables, stop=None):
    if not models:
      models.append(codec.build_model(codec.of_experiment(config, jax.devices()[0].platform)))
    # The training state is a global array (replicated over every process's devices); the
    # inference runs on this process's devices only, from one local copy.
    local = jax.tree.map(lambda x: x.addressable_data(0), variables)
    return evaluate_model(
      whole, apply_fn, local, progress=False, stop=stop, keep=config.num_summary_images
    )

  return validate
