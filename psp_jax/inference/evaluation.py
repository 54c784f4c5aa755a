"""Evaluation of a checkpoint on a data set split with the official protocol (tool/test.py).

`python -m psp_jax.evaluate` is its command line: mIoU / mAcc / allAcc, a per-class table,
results.{txt,md,json}. The checkpoint is a training workdir, a converted checkpoint
directory or an official PyTorch .pth (converted on the fly).

Protocols: 'official' (hszhao/semseg) averages IoU and accuracy over *all* classes, a class
absent from both prediction and ground truth counting 0; 'mmseg' averages over the classes
present. The flip is a separate switch: the official single-scale numbers use it,
mmsegmentation's default test pipeline does not.

Multi-host: each host evaluates its own part of the split on its own devices; the
confusion matrices are summed over hosts at the end.
"""

import json
import math
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from psp_jax import metrics
from psp_jax.inference.sliding_window import InferenceConfig, SlidingWindowInference
from psp_jax.train import config as train_config

# A device's int32 confusion counts are moved to the host before they could overflow.
_INT32_MAX = 2**31 - 1


def evaluate_examples(
  inference: SlidingWindowInference,
  examples: Iterable[dict[str, np.ndarray]],
  *,
  total: int | None = None,
  progress: bool = True,
) -> np.ndarray:
  """Confusion matrix of this host's examples.

  Images with one plan key (all of them in slide mode; one size bucket in whole mode) are
  batched one per device; a partial last batch leaves devices idle.

  Args:
    examples: dicts with 'image' uint8 [H, W, 3] and 'label' int [H, W] (255 = ignore).
    total: number of examples, for the progress bar.

  Returns:
    int64 [K, K] confusion matrix, rows ground truth, columns prediction.
  """
  k = inference.num_classes
  host_total = np.zeros((k, k), np.int64)
  confusion = inference.zero_confusion()
  pending: dict[tuple, list[tuple[Any, np.ndarray]]] = {}
  pixels = 0  # Upper bound of any device's counts since the last move to the host.

  def run(group):
    nonlocal confusion, host_total, pixels
    most = max(plan.height * plan.width for plan, _ in group)
    # Waits for the previous step: at most one step queued while the host plans the next.
    confusion.block_until_ready()
    if pixels + most > _INT32_MAX:
      host_total += np.asarray(confusion).astype(np.int64).sum(0)
      confusion, pixels = inference.zero_confusion(), 0
    plans, labels = zip(*group, strict=True)
    _, confusion = inference.run(plans, labels, confusion, outputs=None)
    pixels += most

  bar = tqdm(total=total, desc='evaluate', unit='img', disable=not progress)
  for example in examples:
    plan = inference.plan(example['image'])
    label = np.asarray(example['label'])
    if label.shape != (plan.height, plan.width):
      raise ValueError(f'label {label.shape} and image {example["image"].shape} sizes differ')
    group = pending.setdefault(plan.key, [])
    group.append((plan, label))
    if len(group) == inference.batch_size:
      run(pending.pop(plan.key))
    bar.update(1)
  for group in pending.values():
    run(group)
  bar.close()
  return host_total + np.asarray(confusion).astype(np.int64).sum(0)


def sum_over_hosts(confusion: np.ndarray) -> np.ndarray:
  """Sum of every host's int64 confusion matrix (exact: sent as pairs of int32 words)."""
  if jax.process_count() == 1:
    return confusion
  words = np.ascontiguousarray(confusion.astype(np.int64)).view(np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(words))
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


def describe(config: InferenceConfig) -> dict[str, Any]:
  """The inference procedure, for the report."""
  out = dict(mode=config.mode, base_size=config.base_size, scales=list(config.scales))
  out['flip'] = config.flip
  if config.mode == 'slide':
    out['crop_size'] = list(config.crop_size)
    out['stride'] = [math.ceil(c * config.stride_rate) for c in config.crop_size]
  else:
    out['whole_multiple'] = config.whole_multiple
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


def write_results(results: dict[str, Any], output_dir: str | os.PathLike) -> None:
  """results.txt, results.md and results.json in output_dir."""
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / 'results.txt').write_text(format_text(results) + '\n')
  (out / 'results.md').write_text(format_markdown(results))
  (out / 'results.json').write_text(json.dumps(results, indent=2) + '\n')


def _normalise(value: Any) -> Any:
  return list(value) if isinstance(value, tuple | list) else value


def evaluate(
  config: ml_collections.ConfigDict, checkpoint: str | os.PathLike, *, progress: bool = True
) -> dict[str, Any]:
  """Loads the checkpoint, evaluates config.data.eval_split and returns summarize()."""
  from psp_jax.data import classes, sources
  from psp_jax.inference.segmenter import load_model

  # The checkpoint fixes the architecture; the config may only change the compute dtype.
  apply_fn, variables, model_config = load_model(checkpoint, dtype=config.model.dtype)
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
    raise ValueError(
      f'{checkpoint} predicts {model_config["num_classes"]} classes but '
      f'config.data.num_classes is {num_classes}: use the matching --config'
    )
  windows = max(1, config.eval.batch_size // jax.device_count())  # Per local device.
  inference_config = InferenceConfig.from_config(config, windows_per_step=windows)
  inference = SlidingWindowInference(
    apply_fn,
    variables,
    num_classes=num_classes,
    config=inference_config,
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
  seen = [0]

  def counted(examples):
    for example in examples:
      seen[0] += 1
      yield example

  confusion = evaluate_examples(
    inference,
    counted(dataset.as_numpy_iterator()),
    total=total,
    progress=progress and jax.process_index() == 0,
  )
  confusion = sum_over_hosts(confusion)
  images = int(sum_over_hosts(np.array([seen[0]], np.int64))[0])
  names = classes.CLASS_NAMES.get(config.data.name) or [f'class {i}' for i in range(num_classes)]
  setup = dict(data=config.data.name, split=split, images=images, **describe(inference_config))
  setup['dtype'] = train_config.compute_dtype(config.model.dtype, jax.default_backend()).name
  return summarize(confusion, names, protocol=config.eval.protocol, setup=setup)
