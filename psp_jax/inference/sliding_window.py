"""Sliding-window, multi-scale, flip-averaged inference of tool/test.py, run on device.

  labels = SlidingWindowInference(apply_fn, variables, num_classes=150).predict(image)

The host plans each image (psp_jax.inference.planning); the devices run the windows, the
averages and the resize back, in compiled functions that never see an image's own size.
Design: docs/design.md#sliding-window-on-device
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from psp_jax import metrics
from psp_jax.inference.planning import ImagePlan, InferenceConfig, plan_image

__all__ = ['InferenceConfig', 'ImagePlan', 'SlidingWindowInference', 'net_process', 'plan_image']

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def net_process(
  apply_fn: ApplyFn, variables: Any, windows: jax.Array, flip: bool, average: str = 'probs'
) -> jax.Array:
  """Softmax of each window, averaged with that of its horizontal flip (net_process).

  Args:
    windows: [B, h, w, 3] normalised images.
    average: 'probs' (softmax) or 'logits' (the raw logits, as mmseg averages them).

  Returns:
    float32 [B, h, w, K] probabilities (or logits).
  """
  batch = windows.shape[0]
  inputs = jnp.concatenate([windows, windows[:, :, ::-1]], 0) if flip else windows
  probs = apply_fn(variables, inputs).astype(jnp.float32)
  if average == 'probs':
    probs = jax.nn.softmax(probs, axis=-1)
  if flip:
    probs = (probs[:batch] + probs[batch:, :, ::-1]) / 2
  return probs


def _scale_probs(
  apply_fn, num_classes, crop, flip, per_step, average, variables, canvas, offsets, count
):
  """scale_process on one device's image: windows -> summed softmax / overlap count.

  canvas [1, Ch, Cw, 3], offsets [1, G, 2], count [1] -> probabilities [1, Ch, Cw, K].
  """
  canvas, offsets, count = canvas[0], offsets[0], count[0]
  # No more windows per forward than this canvas can hold (small scales have one).
  per_step = min(per_step, offsets.shape[0])
  crop_h, crop_w = crop
  height, width = canvas.shape[:2]
  probs = jnp.zeros((height, width, num_classes), jnp.float32)
  hits = jnp.zeros((height, width, 1), jnp.float32)

  def body(step, carry):
    probs, hits = carry
    index = step * per_step + jnp.arange(per_step)
    starts = offsets[jnp.minimum(index, offsets.shape[0] - 1)]
    windows = jax.vmap(lambda s: jax.lax.dynamic_slice(canvas, (s[0], s[1], 0), (*crop, 3)))(starts)
    out = net_process(apply_fn, variables, windows, flip, average)
    for j in range(per_step):  # Static; the last step's surplus windows get weight 0.
      valid = (index[j] < count).astype(jnp.float32)
      start = (starts[j, 0], starts[j, 1], 0)
      old = jax.lax.dynamic_slice(probs, start, (crop_h, crop_w, num_classes))
      probs = jax.lax.dynamic_update_slice(probs, old + valid * out[j], start)
      old = jax.lax.dynamic_slice(hits, start, (crop_h, crop_w, 1))
      hits = jax.lax.dynamic_update_slice(hits, old + valid, start)
    return probs, hits

  steps = (count + per_step - 1) // per_step  # Each device loops over its own windows only.
  probs, hits = jax.lax.fori_loop(0, steps, body, (probs, hits))
  return (probs / jnp.maximum(hits, 1.0))[None]


@functools.partial(
  jax.jit,
  static_argnames=('apply_fn', 'mesh', 'num_classes', 'crop', 'flip', 'per_step', 'average'),
)
def scale_canvases(
  variables,
  canvas,
  offsets,
  count,
  *,
  apply_fn,
  mesh,
  num_classes,
  crop,
  flip,
  per_step,
  average='probs',
):
  """_scale_probs on every device of `mesh`, one image each.

  Module-level, so equal configurations share compilations across instances.
  shard_map: each device loops over the windows of its own image, however many.
  """
  fn = functools.partial(_scale_probs, apply_fn, num_classes, crop, flip, per_step, average)
  return jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=(P(), P('data'), P('data'), P('data')),
    out_specs=P('data'),
    check_vma=False,
  )(variables, canvas, offsets, count)


def _resize_tile(canvas, rows, cols):
  """Bilinear resize of part of a canvas [Ch, Cw, K] to a [T, T, K] tile.

  The four source pixels of every output pixel are gathered directly; the arithmetic is
  cv2's (horizontal lerps first, then the vertical one).
  """
  (r0, r1, rf), (c0, c1, cf) = rows, cols
  cf, rf = cf[None, :, None], rf[:, None, None]

  def hresize(r):  # Row indices [T] -> [T, T, K].
    return canvas[r[:, None], c0[None, :]] * (1 - cf) + canvas[r[:, None], c1[None, :]] * cf

  return hresize(r0) * (1 - rf) + hresize(r1) * rf


@functools.partial(
  jax.jit, static_argnames=('num_classes', 'ignore_label', 'mode'), donate_argnames='confusion'
)
def finish_tile(canvases, rows, cols, labels, confusion, *, num_classes, ignore_label, mode):
  """Resize each scale back to one original-size tile, average, argmax, count.

  canvases: tuple over scales of [n, Ch, Cw, K]; rows, cols: tuples (i0, i1, frac) of
  [n, S, T]; labels [n, T, T]; confusion [n, K, K]. mode 'labels' returns the argmax tile
  [n, T, T], 'probs' the averaged probabilities [n, T, T, K].
  """

  def one(canvases, rows, cols):
    total = 0.0
    for s, canvas in enumerate(canvases):
      total = total + _resize_tile(canvas, [r[s] for r in rows], [c[s] for c in cols])
    return total / len(canvases)  # prediction /= len(scales)

  probs = jax.vmap(one)(canvases, rows, cols)
  pred = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  confusion = confusion + jax.vmap(
    lambda p, t: metrics.confusion_matrix(p, t, num_classes, ignore_label)
  )(pred, labels)
  return (probs if mode == 'probs' else pred), confusion


class SlidingWindowInference:
  """The official test procedure for a model, on all local devices, one image per device.

  Usage: `labels = SlidingWindowInference(apply_fn, variables, num_classes=K).predict(img)`,
  or `plan_image` + `run` for batches with labels and a confusion matrix (psp_jax.evaluate).
  """

  def __init__(
    self,
    apply_fn: ApplyFn,
    variables: Any,
    *,
    num_classes: int,
    procedure: InferenceConfig | None = None,
    ignore_label: int = 255,
    devices: Sequence[jax.Device] | None = None,
  ):
    """apply_fn(variables, images [B, H, W, 3]) -> logits [B, H, W, K] at the input size."""
    self.procedure = procedure or InferenceConfig()
    self.num_classes = num_classes
    self.ignore_label = ignore_label
    devices = list(devices) if devices is not None else jax.local_devices()
    self.mesh = Mesh(np.array(devices), ('data',), axis_types=(AxisType.Auto,))
    self._batch = NamedSharding(self.mesh, P('data'))
    self.variables = jax.device_put(variables, NamedSharding(self.mesh, P()))
    self._apply_fn = apply_fn

  @property
  def batch_size(self) -> int:
    """Images per step: one per local device."""
    return self.mesh.size

  def plan(self, image: np.ndarray) -> ImagePlan:
    """Host-side preparation of one image [H, W, 3]; see plan_image."""
    return plan_image(np.asarray(image), self.procedure)

  def zero_confusion(self) -> jax.Array:
    """Per-device confusion matrices int32 [n, K, K] (sum over axis 0 for the total)."""
    k = self.num_classes
    return jax.device_put(np.zeros((self.batch_size, k, k), np.int32), self._batch)

  def canvases(self, plans: Sequence[ImagePlan]) -> tuple[jax.Array, ...]:
    """Count-normalised probability canvases, one [n, Ch, Cw, K] array per scale."""
    n = self.batch_size
    if not 0 < len(plans) <= n or len({p.key for p in plans}) != 1:
      raise ValueError(f'run takes 1..{n} plans with one key (see ImagePlan.key)')
    out = []
    for s, first in enumerate(plans[0].scales):
      scale_plans = [p.scales[s] for p in plans]
      canvas = np.zeros((n, *first.canvas.shape), np.float32)
      offsets = np.zeros((n, *first.offsets.shape), np.int32)
      count = np.zeros((n,), np.int32)  # Padding slots: no windows, no work.
      for i, sp in enumerate(scale_plans):
        canvas[i], offsets[i], count[i] = sp.canvas, sp.offsets, sp.num_windows
      args = jax.device_put((canvas, offsets, count), self._batch)
      out.append(
        scale_canvases(
          self.variables,
          *args,
          apply_fn=self._apply_fn,
          mesh=self.mesh,
          num_classes=self.num_classes,
          crop=first.crop,
          flip=self.procedure.flip,
          per_step=self.procedure.windows_per_step,
          average=self.procedure.average,
        )
      )
    return tuple(out)

  def run(
    self,
    plans: Sequence[ImagePlan],
    labels: Sequence[np.ndarray] | None = None,
    confusion: jax.Array | None = None,
    *,
    outputs: str | None = 'labels',
  ) -> tuple[list[np.ndarray] | None, jax.Array | None]:
    """Runs up to batch_size planned images with equal keys.

    Args:
      plans: from `plan`; fewer than batch_size leaves devices idle.
      labels: optional ground truth, int [H, W] per plan (ignore_label excluded).
      confusion: accumulator from zero_confusion, updated when labels are given.
      outputs: 'labels' (int32 [H, W] each), 'probs' (float32 [H, W, K]) or None.

    Returns:
      (outputs per plan or None, confusion).
    """
    t, k = self.procedure.tile_size, self.num_classes
    canvases = self.canvases(plans)
    if confusion is None:
      confusion = self.zero_confusion()
    tiles = [[(y, x) for y in range(0, p.height, t) for x in range(0, p.width, t)] for p in plans]
    results = None
    if outputs is not None:
      shape = (k,) if outputs == 'probs' else ()
      dtype = np.float32 if outputs == 'probs' else np.int32
      results = [np.zeros((p.height, p.width, *shape), dtype) for p in plans]
    for j in range(max(len(tl) for tl in tiles)):
      places = [tl[j] if j < len(tl) else None for tl in tiles]
      args = jax.device_put(self._tile_inputs(plans, places, labels), self._batch)
      tile_out, confusion = finish_tile(
        canvases,
        *args,
        confusion,
        num_classes=self.num_classes,
        ignore_label=self.ignore_label,
        mode=outputs or 'labels',
      )
      if results is not None:
        tile_out = np.asarray(tile_out)
        for i, place in enumerate(places):
          if place is not None:
            (y, x), out = place, results[i]
            out[y : y + t, x : x + t] = tile_out[i, : out.shape[0] - y, : out.shape[1] - x]
    return results, confusion

  def _tile_inputs(self, plans, places, labels):
    """Host arrays of one tile per device: where each tile row / column reads each canvas."""
    n, t, num_scales = self.batch_size, self.procedure.tile_size, len(plans[0].scales)
    index = np.zeros((2, 2, n, num_scales, t), np.int32)  # (rows, cols), (i0, i1)
    frac = np.zeros((2, n, num_scales, t), np.float32)
    tile_labels = np.full((n, t, t), self.ignore_label, np.int32)
    for i, (plan, place) in enumerate(zip(plans, places, strict=True)):
      if place is None:
        continue  # This image is done; its slot computes a tile nobody reads.
      y, x = place
      h, w = min(t, plan.height - y), min(t, plan.width - x)
      for s, sp in enumerate(plan.scales):
        for axis, (lookup, start, size) in enumerate(((sp.rows, y, h), (sp.cols, x, w))):
          index[axis, 0, i, s, :size] = lookup[0][start : start + size]
          index[axis, 1, i, s, :size] = lookup[1][start : start + size]
          frac[axis, i, s, :size] = lookup[2][start : start + size]
      if labels is not None:
        tile_labels[i, :h, :w] = labels[i][y : y + h, x : x + w]
    rows = (index[0, 0], index[0, 1], frac[0])
    cols = (index[1, 0], index[1, 1], frac[1])
    return rows, cols, tile_labels

  def predict(self, image: np.ndarray) -> np.ndarray:
    """Label map int32 [H, W] of one RGB image [H, W, 3] (uint8 or float on 0..255)."""
    return self.run([self.plan(image)])[0][0]

  def probabilities(self, image: np.ndarray) -> np.ndarray:
    """Scale-averaged class probabilities float32 [H, W, K] of one image [H, W, 3].

    With procedure.average='logits' these are the averaged logits, resized back.
    """
    return self.run([self.plan(image)], outputs='probs')[0][0]
