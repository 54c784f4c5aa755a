"""What a training run shows: TensorBoard scalars and images, a progress bar, the config.

Only process 0 writes files; the other processes log nothing and show no bar.
"""

import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers
from tqdm import tqdm

from psp_jax import paths, visualize, weights
from psp_jax.train import config_checks


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard event files in workdir on process 0 (plus logging); logging elsewhere."""
  return metric_writers.create_default_writer(
    workdir, just_logging=jax.process_index() > 0, asynchronous=True
  )


def write_config(workdir: str, config: ml_collections.ConfigDict, model_config: dict) -> None:
  """Writes config.json (the resolved run config) and model_config.json (PSPNet kwargs).

  model_config.json is what psp_jax.weights.load_variables rebuilds the model from.
  """
  if jax.process_index() > 0:
    return
  path = paths.as_path(workdir)  # local, or gs://... on a TPU VM
  path.mkdir(parents=True, exist_ok=True)
  (path / weights.RUN_CONFIG_FILE).write_text(
    config.to_json_best_effort(indent=2, sort_keys=True) + '\n'
  )
  weights.write_model_config(path, model_config)


SCALAR_LOG_BYTES = 2048  # one log step's train scalars, generously


def events_bytes(config: ml_collections.ConfigDict, total_steps: int) -> int:
  """An estimate of the TensorBoard events a run writes: each validation's example panels
  (num_summary_images of input | truth | prediction, as uncompressed RGB at the crop size:
  validation images are about that size in the official recipes) and each log step's
  scalars."""
  validations = total_steps // max(1, config.eval_every_steps) + 1
  logs = total_steps // max(1, config.log_every_steps) + 1
  height, width = config_checks.crop_pair(config.data.crop_size)
  panel = 3 * height * width * 3
  return validations * config.num_summary_images * panel + logs * SCALAR_LOG_BYTES


def example_panels(
  examples: Sequence[Mapping[str, np.ndarray]], palette: np.ndarray, *, ignore_label: int = 255
) -> np.ndarray:
  """Rows of input | ground truth | prediction, coloured with the data set's palette.

  Args:
    examples: {'image' uint8 [H, W, 3], 'label' int [H, W] (ignore_label drawn black),
      'pred' int [H, W]} each, of any sizes.
    palette: uint8 [K, 3].
    ignore_label: label drawn black.

  Returns:
    uint8 [N, H, 3 * W + gaps, 3], rows padded black to the largest.
  """
  rows = []
  for ex in examples:
    label = ex['label']
    truth = visualize.colorize(label, palette, ignore_label=ignore_label)
    guess = visualize.colorize(np.where(label == ignore_label, ignore_label, ex['pred']), palette)
    rows.append(visualize.side_by_side([ex['image'], truth, guess]))
  height, width = max(r.shape[0] for r in rows), max(r.shape[1] for r in rows)
  return np.stack(
    [np.pad(r, ((0, height - r.shape[0]), (0, width - r.shape[1]), (0, 0))) for r in rows]
  )


class Progress:
  """A tqdm bar over the run's steps with loss, lr, images/s and the ETA (process 0 only)."""

  def __init__(self, total_steps: int, start_step: int, batch_size: int):
    self._bar = tqdm(
      total=total_steps,
      initial=start_step,
      desc='train',
      unit='step',
      dynamic_ncols=True,
      disable=jax.process_index() > 0,
    )
    self._batch_size = batch_size
    self._last_step, self._last_time = start_step, time.perf_counter()

  def restart_clock(self, step: int) -> None:
    """Excludes time spent outside training steps (evaluation, compilation) from the rate."""
    self._last_step, self._last_time = step, time.perf_counter()

  def update(self, step: int, scalars: Mapping[str, float] | None = None) -> float | None:
    """Moves the bar to `step`; with scalars (a logging step, after the device finished),
    shows them and returns the images/s since the previous logging step or restart."""
    self._bar.update(step - self._bar.n)
    if scalars is None:
      return None
    now = time.perf_counter()
    rate = None
    if step > self._last_step and now > self._last_time:
      rate = (step - self._last_step) * self._batch_size / (now - self._last_time)
    self._last_step, self._last_time = step, now
    postfix = {'loss': f'{scalars["loss"]:.4f}', 'lr': f'{scalars["lr"]:.2e}'}
    if rate is not None:
      postfix['img/s'] = f'{rate:.1f}'
    self._bar.set_postfix(postfix, refresh=False)
    return rate

  def write(self, message: str) -> None:
    """Prints a line above the bar."""
    if jax.process_index() == 0:
      self._bar.write(message)

  def close(self) -> None:
    self._bar.close()


def scalars_of(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
  """{prefix/name: float} of scalar metrics."""
  return {f'{prefix}/{k}': float(np.asarray(v)) for k, v in metrics.items()}
