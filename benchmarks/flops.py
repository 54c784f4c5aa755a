"""Analytic FLOPs of a JAX function: its convolutions and matrix products, read off the jaxpr."""

import math
from collections.abc import Callable
from typing import Any


def _conv_flops(eqn: Any) -> float:
  """2 x useful multiply-adds of one conv_general_dilated.

  Every output element sums kernel_spatial x in_features products. A transposed convolution
  (the input gradient of a strided conv) is written with lhs_dilation s: only 1 / s^2 of its
  window taps meet a real (non-inserted) input element, so those are the useful ones.
  """
  out = eqn.outvars[0].aval
  rhs = eqn.invars[1].aval
  spec = eqn.params['dimension_numbers'].rhs_spec  # (out feature, in feature, *spatial)
  window = math.prod(rhs.shape[d] for d in spec[2:])
  macs = math.prod(out.shape) * window * rhs.shape[spec[1]]
  macs /= math.prod(eqn.params.get('lhs_dilation') or (1,))
  return 2.0 * macs


def _dot_flops(eqn: Any) -> float:
  """2 x multiply-adds of one dot_general: output size x contracted size."""
  out = eqn.outvars[0].aval
  lhs = eqn.invars[0].aval
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  return 2.0 * math.prod(out.shape) * math.prod(lhs.shape[d] for d in lhs_contract)


def _sub_jaxprs(value: Any):
  """The jaxprs held by one equation parameter (a jaxpr, a closed jaxpr, or a tuple of them)."""
  if hasattr(value, 'eqns'):
    yield value
  elif hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    yield value.jaxpr
  elif isinstance(value, tuple | list):
    for v in value:
      yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr: Any) -> dict[str, float]:
  """FLOPs of the convolutions and dot_generals of a jaxpr, nested calls and scans included.

  Args:
    jaxpr: a Jaxpr or ClosedJaxpr.

  Returns:
    {'conv': float, 'dot': float}: 2 FLOPs per multiply-add. A scan counts `length` times,
    a cond its most expensive branch; elementwise work is not counted.
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = {'conv': 0.0, 'dot': 0.0}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      total['conv'] += _conv_flops(eqn)
    elif name == 'dot_general':
      total['dot'] += _dot_flops(eqn)
    subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
    if not subs:
      continue
    counts = [jaxpr_flops(j) for j in subs]
    if name == 'cond':
      counts = [max(counts, key=lambda c: c['conv'] + c['dot'])]
    times = eqn.params.get('length', 1) if name == 'scan' else 1
    for c in counts:
      for k in total:
        total[k] += times * c[k]
  return total


def function_flops(fn: Callable[..., Any], *args: Any) -> dict[str, float]:
  """jaxpr_flops of fn traced at args (arrays or jax.ShapeDtypeStruct; nothing runs).

  Args:
    fn: a JAX-traceable function (jitted or not).
    *args: its arguments.

  Returns:
    {'conv', 'dot', 'total'} FLOPs.
  """
  import jax  # noqa: PLC0415

  counts = jaxpr_flops(jax.make_jaxpr(fn)(*args))
  return {**counts, 'total': counts['conv'] + counts['dot']}


def xla_flops(compiled: Any) -> float | None:
  """The 'flops' of XLA's cost analysis of a compiled function (None if not reported)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else {}
  value = (cost or {}).get('flops')
  return None if value is None else float(value)
