"""What a training run shows: TensorBoard scalars and images, a progress bar, the config.

Only process 0 writes files; the other processes log nothing and show no bar.
"""

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers  # noqa: I001 (after psp_jax.data._tf on purpose)
from tqdm import tqdm

from psp_jax import paths, visualize, weights
from psp_jax.data._tf import tf  # noqa: F401 (quiet and off accelerators before clu imports it)
from psp_jax.inference import plan as inference_plan

_CHATTY = ('/orbax/', '/tensorflow_datasets/', '/clu/')


class _QuietLibraries(logging.Filter):
  """Drops the INFO lines of orbax, TFDS and clu (a dozen per checkpoint); keeps warnings."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(s in record.pathname for s in _CHATTY)


def quiet_library_logs() -> None:
  """Installs _QuietLibraries on every handler of the root logger (absl's included)."""
  for handler in logging.getLogger().handlers:
    handler.addFilter(_QuietLibraries())


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard event files in workdir on process 0 (plus logging); logging elsewhere."""
  return metric_writers.create_default_writer(
    workdir, just_logging=jax.process_index() > 0, asynchronous=True
  )


def write_config(workdir: str, config: ml_collections.ConfigDict, model_config: dict) -> None:
  """Writes config.json (the resolved run config) and model_config.json (PSPNet kwargs).

  model_config.json is what psp_jax.weights / psp_jax.predict rebuild the model from.
  """
  if jax.process_index() > 0:
    return
  path = paths.as_path(workdir)  # local, or gs://... on a TPU VM
  path.mkdir(parents=True, exist_ok=True)
  (path / weights.RUN_CONFIG_FILE).write_text(
    config.to_json_best_effort(indent=2, sort_keys=True) + '\n'
  )
  (path / weights.CONFIG_FILE).write_text(json.dumps(model_config, indent=2, sort_keys=True) + '\n')


def palette_of(dataset: str, num_classes: int) -> np.ndarray:
  """The data set's palette (psp_jax.data.classes.PALETTES), or a fixed random one."""
  from psp_jax.data import classes  # noqa: PLC0415 (classes pulls in the data package)

  palette = classes.PALETTES.get(dataset)
  if palette is not None and len(palette) >= num_classes:
    return np.asarray(palette, np.uint8)
  return np.random.default_rng(0).integers(0, 256, (num_classes, 3)).astype(np.uint8)


def denormalize(images: np.ndarray) -> np.ndarray:
  """Normalised float images [N, H, W, 3] back to uint8 RGB."""
  images = np.asarray(images) * inference_plan.STD + inference_plan.MEAN
  return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def example_panels(
  images: np.ndarray,
  labels: np.ndarray,
  preds: np.ndarray,
  palette: np.ndarray,
  *,
  ignore_label: int = 255,
  count: int = 4,
) -> np.ndarray:
  """Rows of input | ground truth | prediction, coloured with the data set's palette.

  Args:
    images: float32 [N, H, W, 3], normalised.
    labels: int [N, H, W] (ignore_label drawn black).
    preds: int [N, H, W].
    palette: uint8 [K, 3].
    ignore_label: label drawn black.
    count: number of examples to draw (at most N).

  Returns:
    uint8 [n, H, 3 * W + gaps, 3].
  """
  rows = []
  for image, label, pred in zip(images[:count], labels[:count], preds[:count], strict=True):
    truth = visualize.colorize(label, palette, ignore_label=ignore_label)
    guess = visualize.colorize(np.where(label == ignore_label, ignore_label, pred), palette)
    rows.append(visualize.side_by_side([denormalize(image), truth, guess]))
  return np.stack(rows)


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
