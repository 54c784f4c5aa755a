"""Safeguards of a training run: stopping cleanly on a signal, and steps with a non-finite loss.

StopRequest (SIGTERM, SIGINT) stops the loop at the next step boundary with a checkpoint;
guard_nonfinite keeps the old state on a non-finite step, and NonFiniteSteps counts such
steps where the loop syncs anyway. Design: docs/design.md#safeguards
"""

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from psp_jax import distributed, errors

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """A train step's loss or gradient norm was NaN or infinite."""


class StopRequest:
  """A context manager: while inside, SIGTERM and SIGINT ask the run to stop.

  The first signal only sets a flag (and logs it); a second SIGINT ends the process at once
  with status 130, for a user who wants out (a checkpoint being written is never left
  half-visible: orbax renames it into place only when complete). The previous handlers come
  back on exit. Outside the main thread (where Python cannot install handlers) nothing is
  installed.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> 'StopRequest':
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is not None and signum == signal.SIGINT:
      # Not `raise KeyboardInterrupt`: raised from a signal handler it surfaces wherever
      # Python is at that moment, and inside a garbage-collection callback or a __del__
      # (jax's _xla_gc_callback, seen in tests/test_train_run.py) it is printed as "Exception
      # ignored" and the run goes on. os._exit cannot be swallowed.
      print(f'Interrupted: second {name}: stopping without a checkpoint.', file=sys.stderr)
      sys.stderr.flush()
      os._exit(130)
    self.signal_name = name
    logging.warning('%s received: the run will save a checkpoint after this step and stop.', name)

  @property
  def requested(self) -> bool:
    """Whether this process received a stop signal."""
    return self.signal_name is not None

  def agreed(self, sync_point: bool) -> bool:
    """Whether every process stops after this step.

    One process decides alone, at every step. Several processes must stop at the same step
    (a checkpoint save is collective), so they agree only at sync points, steps that every
    process marks as such (the logging steps), with one small all-gather of the flags.

    Args:
      sync_point: whether this step is a sync point.

    Returns:
      True if the run must save and stop now.
    """
    if jax.process_count() == 1:
      return self.requested
    if not sync_point:
      return False
    flags = distributed.allgather(np.int32(self.requested), 'stop request')
    return bool(np.any(flags))


def guard_nonfinite(train_step: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps a pure train step so a non-finite loss or gradient changes no weights.

  When metrics['loss'] or metrics['grad_norm'] is NaN or infinite, the new state is the old
  one (parameters, BatchNorm statistics, optimiser state) except for the step counter, which
  still advances (the batch was consumed, and resuming must read the next one). A finite
  step is unchanged bit for bit (a select). metrics gains 'nonfinite' (1.0 for such a step).

  Args:
    train_step: train_step(state, batch, rng) -> (state, metrics) (train_step.make_train_step).

  Returns:
    The guarded train step, same signature.
  """

  def guarded(state, batch, rng):
    new_state, metrics = train_step(state, batch, rng)
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = dict(metrics, nonfinite=jnp.logical_not(finite).astype(jnp.float32))
    return kept.replace(step=new_state.step), metrics

  return guarded


def describe(metrics: dict[str, Any]) -> str:
  """'loss=nan main_loss=nan aux_loss=2.31 ...' of one step's host metrics."""
  names = [k for k in ('loss', 'main_loss', 'aux_loss', 'grad_norm') if k in metrics]
  names += sorted(k for k in metrics if k not in names and k != 'nonfinite')
  return ' '.join(f'{k}={float(np.asarray(metrics[k])):.6g}' for k in names)


class NonFiniteSteps:
  """Watches the 'nonfinite' flags of the steps since the last check.

  Attributes:
    skip: whether such steps are skipped (counted) rather than fatal.
    skipped: steps skipped so far in this run.
  """

  def __init__(self, skip: bool):
    self.skip = skip
    self.skipped = 0
    self._unchecked: list[tuple[int, dict[str, jax.Array]]] = []

  def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
    """Records step's metrics (device arrays; nothing is fetched)."""
    self._unchecked.append((step, metrics))

  def check(self, last_checkpoint: int | None) -> list[int]:
    """Fetches the flags recorded since the last check.

    Args:
      last_checkpoint: step of the newest saved checkpoint, for the message.

    Returns:
      The steps that were skipped (in skip mode).

    Raises:
      NonFiniteLossError: naming the first bad step and its loss parts, unless skip.
    """
    if not self._unchecked:
      return []
    flags = jax.device_get([m['nonfinite'] for _, m in self._unchecked])
    bad = [(s, m) for (s, m), flag in zip(self._unchecked, flags, strict=True) if flag > 0]
    self._unchecked = []
    for step, metrics in bad:
      parts = describe(jax.device_get(metrics))
      if not self.skip:
        kept = 'none yet' if last_checkpoint is None else f'step {last_checkpoint}'
        raise NonFiniteLossError(
          f'Non-finite loss at step {step}: {parts}. Training stopped; no checkpoint was '
          f'written after it and the newest one ({kept}) is kept. Rerun to resume from it '
          '(e.g. with a lower config.optim.base_lr), or set '
          '--config.optim.skip_nonfinite_steps=True to skip such steps and count them.'
        )
      self.skipped += 1
      logging.warning(
        'Skipped step %d: non-finite loss (%s); its update was not applied. %d step(s) '
        'skipped in this run.',
        step,
        parts,
        self.skipped,
      )
    return [s for s, _ in bad]


def finite_mean(host_metrics: list[dict[str, Any]]) -> dict[str, float]:
  """Mean of each metric over the steps whose loss was finite (all steps if none was)."""
  finite = [m for m in host_metrics if not m.get('nonfinite', 0)] or host_metrics
  keys = [k for k in host_metrics[0] if k != 'nonfinite']
  return {k: float(np.mean([m[k] for m in finite])) for k in keys}
