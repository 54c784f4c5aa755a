"""The ONNX conversion: jax2onnx on our program, with the one rewrite onnxruntime needs.

`without_window_max` writes every reduce_window_max (the stem's max pool, which jax2onnx
lowers to a 4-D MaxPool that onnxruntime refuses) as a maximum of strided slices, exactly.
Design: docs/serving.md#the-onnx-rewrite
"""

import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

# Packages whose log lines the conversion drops below ERROR: at import jax2onnx logs a
# traceback for each of its plugins whose library is missing or too new (dm_pix), and each
# conversion at INFO; onnx_ir warns of constants it keeps untyped. None concerns our graph.
NOISY_PACKAGES = ('jax2onnx', 'onnx_ir')
OPSET = 23


def window_max_by_slices(x: jax.Array, **params: Any) -> jax.Array:
  """reduce_window_max as the maximum of strided slices (window and base dilation 1).

  Args:
    x: the operand, any rank.
    params: the reduce_window_max equation's window_dimensions, window_strides, padding,
      base_dilation and window_dilation.
  """
  window, strides = params['window_dimensions'], params['window_strides']
  if any(d != 1 for d in (*params['base_dilation'], *params['window_dilation'])):
    raise NotImplementedError('reduce_window_max with dilation: no rewrite for ONNX')
  # jnp.pad, not lax.pad: jax2onnx's lax.pad lowering cannot take a symbolic batch size,
  # its jnp.pad one can.
  x = jnp.pad(x, [tuple(p) for p in params['padding']], constant_values=-jnp.inf)
  counts = [(n - k) // s + 1 for n, k, s in zip(x.shape, window, strides, strict=True)]
  out = None
  for start in itertools.product(*(range(k) for k in window)):
    limit = [o + (c - 1) * s + 1 for o, c, s in zip(start, counts, strides, strict=True)]
    piece = jax.lax.slice(x, start, limit, strides)
    out = piece if out is None else jnp.maximum(out, piece)
  return out


def _evaluate(jaxpr: Any, consts: Sequence[Any], *args: Any) -> list[Any]:
  """Runs a jaxpr equation by equation, rewriting reduce_window_max (see module doc)."""
  env: dict[Any, Any] = {}

  def read(var: Any) -> Any:
    return var.val if isinstance(var, jax_core.Literal) else env[var]

  env.update(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))
  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name == 'reduce_window_max':
      outputs = [window_max_by_slices(*inputs, **eqn.params)]
    elif name in ('jit', 'pjit', 'closed_call'):
      inner = eqn.params['jaxpr' if 'jaxpr' in eqn.params else 'call_jaxpr']
      outputs = _evaluate(inner.jaxpr, inner.consts, *inputs)
    elif name in ('custom_jvp_call', 'custom_vjp_call'):
      inner = eqn.params['call_jaxpr']
      outputs = _evaluate(inner.jaxpr, inner.consts, *inputs)
    else:
      outputs = eqn.primitive.bind(*inputs, **eqn.params)
      if not eqn.primitive.multiple_results:
        outputs = [outputs]
    env.update(zip(eqn.outvars, outputs, strict=True))
  return [read(v) for v in jaxpr.outvars]


def without_window_max(fn: Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
  """fn (one array in, one out) re-traced with reduce_window_max as slices and maxima."""

  def rewritten(x: jax.Array) -> jax.Array:
    closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(x.shape, x.dtype))
    (out,) = _evaluate(closed.jaxpr, closed.consts, x)
    return out

  return rewritten


class _ConverterNoise(logging.Filter):
  """Drops the converter's records below ERROR (see NOISY_PACKAGES)."""

  def filter(self, record: logging.LogRecord) -> bool:
    inside = any(f'{os.sep}{name}{os.sep}' in record.pathname for name in NOISY_PACKAGES)
    return record.levelno >= logging.ERROR or not inside


@contextlib.contextmanager
def quiet_converter() -> Iterator[None]:
  """Silences jax2onnx and onnx_ir below ERROR for the duration, on every root handler.

  A filter on the handlers, not the loggers' levels: jax2onnx also logs through the root
  logger itself (logging.info), which absl shows at INFO.
  """
  handlers = logging.getLogger().handlers
  noise = _ConverterNoise()
  for handler in handlers:
    handler.addFilter(noise)
  try:
    yield
  finally:
    for handler in handlers:
      handler.removeFilter(noise)


def to_onnx(
  fn: Callable[[jax.Array], jax.Array],
  shape: Sequence[int | str],
  dtype: Any,
  *,
  output_name: str,
  input_name: str,
) -> Any:
  """onnx.ModelProto of fn (uint8 images -> one output), weights as initializers.

  Args:
    fn: the serving function; its closed-over weights become the model's initializers.
    shape: its input's shape; a str dimension (the batch, 'B') is symbolic.
    dtype: its input's dtype.
    output_name, input_name: the graph's input and output names.
  """
  with quiet_converter():
    import jax2onnx  # noqa: PLC0415 (optional: the `export` extra)

    return jax2onnx.to_onnx(
      without_window_max(fn),
      [jax.ShapeDtypeStruct(tuple(shape), dtype)],
      model_name='pspnet',
      opset=OPSET,
      input_names=[input_name],
      output_names=[output_name],
    )
