"""HBM traffic of a compiled TPU program, read from its optimised HLO (our estimate).

XLA's `cost_analysis()['bytes accessed']` counts a TPU matmul or convolution at 4.5-8x the
tensors it touches (docs/tpu.md), so the pre-flight's roofline uses this count instead:
every top-level op of the entry computation (while bodies times their trip count) reads its
operands and writes its results once, at the tiled layouts the HLO prints (tile padding
included); buffers outside HBM (memory spaces S(1) and up: VMEM, SMEM, sync flags) cost
nothing; an async -start reads, its -done writes, so a pair counts once; parameters,
constants, tuples and bitcasts move nothing themselves. A fusion that only slices an operand
counts the slices, and one that updates a buffer in place counts the update.

  estimate = traffic(compiled.as_text())   # Traffic(bytes=..., by_op={...}, exact=...)
  estimate.part_bytes['layer3'], estimate.part_flops['layer3']   # by model part (PARTS)
"""

import collections
import dataclasses
import math
import re
from typing import Any

_BYTES = {'f64': 8, 's64': 8, 'u64': 8, 'c64': 8, 'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2}
_BYTES |= {'f16': 2, 's16': 2, 'u16': 2, 's8': 1, 'u8': 1, 'pred': 1, 'f8e4m3fn': 1}
_BYTES |= {'f8e5m2': 1, 'c128': 16}
# One array shape: dtype, dims, and the layout in braces (minor-to-major, tiles, memory space).
# A dtype not listed (sub-byte types) is not matched: it counts 0, and the estimate is low.
_ARRAY = re.compile(r'\b(' + '|'.join(_BYTES) + r'|token)\[([\d,]*)\](\{[^}]*\})?')
_HEADER = re.compile(r'^(ENTRY\s+)?%(\S+)\s+\(.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(ROOT\s+)?%(\S+)\s*=\s*(.*)$')
_CALLS = re.compile(r'\b(?:calls|body|to_apply)=%([\w.\-]+)')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
FREE = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast', 'after-all'}
FREE |= {'opt-barrier', 'add-dependency', 'partition-id', 'replica-id'}
SLICES = {'slice', 'dynamic-slice'}


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  shape: str  # The result's shape text (a tuple of arrays for some ops).
  op: str
  operands: tuple[str, ...]
  arguments: str  # The text in the op's parentheses (a parameter's number).
  rest: str  # Attributes: calls=, metadata, backend_config.
  root: bool = False


@dataclasses.dataclass
class Traffic:
  """HBM bytes a program moves per run, in total and by top-level op kind.

  exact: False when a while loop's trip count was not in the HLO (its body counted once), so
  the estimate may be low; True otherwise.
  """

  bytes: int = 0
  by_op: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
  by_name: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
  # By model part (part_of): the bytes, and our count of the convolutions' and dots' FLOPs.
  part_bytes: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
  part_flops: dict[str, float] = dataclasses.field(default_factory=collections.Counter)
  exact: bool = True

  def add(self, op: str, name: str, n: int, flops: float = 0.0) -> None:
    self.bytes += n
    self.by_op[op] += n
    self.by_name[name] += n
    part = part_of(name, op)
    self.part_bytes[part] += n
    self.part_flops[part] += flops


OUTPUT = '(outputs)'  # The label of what only the program's outputs use (the new state).
_OUT = re.escape(OUTPUT)
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all')
_COLLECTIVE_OP = re.compile(r'=\s*(.*?)\s(' + '|'.join(COLLECTIVES) + r')(-done)?\(')
# Model parts, in report order, by the op_name metadata JAX writes (forward under jvp(PSPNet),
# backward under transpose(jvp(PSPNet))): the first rule that matches names the part.
PARTS = (
  ('BatchNorm', re.compile(r'PSPNet\)+/.*/bn\d*(/|$)')),
  ('stem', re.compile(r'PSPNet\)+/backbone/(layer0(/|$)|(?!layer))|^batch\[\W*image')),
  *((f'layer{n}', re.compile(rf'PSPNet\)+/backbone/layer{n}/')) for n in range(1, 5)),
  ('PPM', re.compile(r'PSPNet\)+/ppm(/|$)')),
  ('heads', re.compile(r'PSPNet\)+/(cls|aux)(/|$)')),
  # The rest of PSPNet (the final resize), the loss and its input.
  ('upsample and loss', re.compile(r'PSPNet\)+/|jvp\(\)|jvp\(jit\(|^batch\[\W*label')),
  # Outside the model and its gradient: optax's update, the non-finite guard, the new state.
  ('optimiser and guard', re.compile(rf'^jit\([^)]*\)/(?!.*jvp)(?!.*threefry)|^state\.|^{_OUT}')),
)
PART_NAMES = (*(name for name, _ in PARTS), 'collectives', 'other')


def part_of(label: str, op: str) -> str:
  """The model part of a top-level op from its kind and op_name (PARTS), or 'other'."""
  if op in COLLECTIVES:
    return 'collectives'
  return next((name for name, rule in PARTS if rule.search(label)), 'other')


def array_bytes(dtype: str, dims: str, layout: str | None, anywhere: bool = False) -> int:
  """Bytes of one array at its tiled layout: 0 outside HBM (memory space S(n>0)) unless
  `anywhere` (the size it would have in HBM)."""
  if dtype == 'token':
    return 0
  shape = [int(d) for d in dims.split(',') if d]
  if layout:
    body = layout[1:-1]
    space = re.search(r'S\((\d+)\)', body)
    if space and int(space.group(1)) != 0 and not anywhere:
      return 0
    order, _, tiling = body.partition(':')
    if order.strip():
      minor_to_major = [int(d) for d in order.split(',')]
      shape = [shape[d] for d in reversed(minor_to_major)]  # Physical order, major first.
    # The first tile pads the minor dimensions; later ones tile within it (bf16 pairs).
    if tile := re.match(r'T\(([\d,]+)\)', tiling):
      sizes = [int(t) for t in tile.group(1).split(',')]
      shape = [1] * max(0, len(sizes) - len(shape)) + shape
      head, tail = shape[: -len(sizes)], shape[-len(sizes) :]
      shape = head + [math.ceil(d / t) * t for d, t in zip(tail, sizes, strict=True)]
  return math.prod(shape) * _BYTES[dtype]


def bytes_by_dtype(shape: str) -> dict[str, int]:
  """Bytes of a shape text's arrays without tile padding (a tuple adds up), by element type
  (HLO's names: f32, bf16, s32, ...)."""
  out: dict[str, int] = {}
  for dtype, dims, _ in _ARRAY.findall(shape):
    out[dtype] = out.get(dtype, 0) + array_bytes(dtype, dims, None)
  return {dtype: size for dtype, size in out.items() if size}


def shape_bytes(shape: str, anywhere: bool = False) -> int:
  """HBM bytes of a shape text: an array or a tuple of them."""
  return sum(array_bytes(*m, anywhere=anywhere) for m in _ARRAY.findall(shape))


def _slice_read(i: Instruction, shapes: dict[str, str]) -> int:
  """Bytes a (dynamic-)slice or its async -start reads: the slice, if its source is in HBM."""
  source = shape_bytes(shapes.get(i.operands[0], '')) if i.operands else 0
  if i.op.endswith('-start'):  # ((operands), result, sync flag)
    return min(source, array_bytes(*_ARRAY.findall(i.shape)[-2], anywhere=True))
  return min(source, shape_bytes(i.shape, anywhere=True))


def _closing(text: str, start: int) -> int:
  """The index of the parenthesis closing the one at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {'(': 1, ')': -1}.get(text[i], 0)
    if depth == 0:
      return i
  raise ValueError(f'unbalanced parentheses in {text[:200]!r}')


def parse(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
  """({computation: its instructions}, the entry computation's name) of HLO text."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = '', None
  for line in hlo_text.splitlines():
    if header := _HEADER.match(line):
      current = computations.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
      continue
    if line.strip() == '}':
      current = None
      continue
    if current is None or not (match := _INSTRUCTION.match(line)):
      continue
    text = match.group(3)
    end = _closing(text, 0) + 1 if text.startswith('(') else text.index(' ')
    shape, rest = text[:end], text[end:].lstrip()
    start = rest.index('(')
    close = _closing(rest, start)
    arguments = rest[start + 1 : close]
    operands = tuple(re.findall(r'%([\w.\-]+)', arguments))
    instruction = Instruction(
      match.group(2),
      shape,
      rest[:start].strip(),
      operands,
      arguments,
      rest[close + 1 :],
      bool(match.group(1)),
    )
    current.append(instruction)
  if not entry:
    raise ValueError('no ENTRY computation in the HLO text')
  return computations, entry


def _fusion_reads(body: list[Instruction]) -> dict[int, int]:
  """{parameter number: bytes read} for the parameters of a fused computation that are only
  sliced (the slices' bytes) or only the buffer of an in-place dynamic-update-slice (0)."""
  params = {i.name: int(i.arguments) for i in body if i.op == 'parameter'}
  users: dict[str, list[tuple[Instruction, int]]] = collections.defaultdict(list)
  for i in body:
    for k, operand in enumerate(i.operands):
      users[operand].append((i, k))
  out = {}
  for name, number in params.items():
    uses = users.get(name, [])
    if uses and all(u.op in SLICES and k == 0 for u, k in uses):
      out[number] = sum(shape_bytes(u.shape, anywhere=True) for u, _ in uses)
    elif uses and all(u.op == 'dynamic-update-slice' and k == 0 for u, k in uses):
      out[number] = 0
  return out


def _written(body: list[Instruction], result: str) -> int:
  """Bytes a fusion writes: its result, but only the update of an in-place update slice."""
  root = next((i for i in body if i.root), None)
  if root is not None and root.op == 'dynamic-update-slice':
    update = {i.name: i.shape for i in body}[root.operands[1]]
    return min(shape_bytes(update, anywhere=True), shape_bytes(result))
  return shape_bytes(result)


_DIM_LABELS = re.compile(r'dim_labels=(\w+)_(\w+)->(\w+)')
_WINDOW = re.compile(r'window=\{([^}]*)\}')
_CONTRACTING = re.compile(r'lhs_contracting_dims=\{([\d,]*)\}')


def _dims(shape: str) -> list[int]:
  """The dimensions of a shape text's first array."""
  match = _ARRAY.search(shape)
  return [int(d) for d in match.group(2).split(',') if d] if match else []


def _window(text: str, n: int) -> dict[str, list]:
  """A convolution's window={...} per spatial dimension: stride, pad (low), lhs/rhs dilation."""
  ones = 'x'.join(['1'] * n)
  fields = dict(stride=ones, lhs_dilate=ones, rhs_dilate=ones, pad='x'.join(['0_0'] * n))
  fields |= dict(f.split('=') for f in text.split())
  out = {
    k: [int(v) for v in fields[k].split('x') if v] for k in ('stride', 'lhs_dilate', 'rhs_dilate')
  }
  out['pad'] = [int(p.split('_')[0]) for p in fields['pad'].split('x') if p]
  return out


def _taps(size: int, out: int, window: int, stride: int, pad: int, lhs: int, rhs: int) -> int:
  """(output, window tap) pairs of one spatial dimension that meet a real input element."""
  last = (size - 1) * lhs  # The last input element, in the lhs-dilated, unpadded frame.
  count = 0
  for o in range(out):
    for k in range(window):
      p = o * stride + k * rhs - pad
      count += 0 <= p <= last and p % lhs == 0
  return count


def op_flops(i: Instruction, shapes: dict[str, str]) -> float:
  """2 x the multiply-adds of a convolution or dot, 0 for other ops.

  A convolution counts, per output, the window taps that meet a real input element: not its
  padding, nor the zeros of an lhs dilation (a transposed conv), nor the padding XLA gives a
  dimension it turns into a window (a batched product compiled as a convolution).
  """
  if i.op == 'convolution' and (labels := _DIM_LABELS.search(i.rest)):
    lhs, rhs = (_dims(shapes.get(o, '')) for o in i.operands[:2])
    out, specs = _dims(i.shape), labels.groups()
    if [len(lhs), len(rhs), len(out)] != [len(spec) for spec in specs]:
      return 0.0
    lhs_spec, rhs_spec, out_spec = specs
    spatial = sorted(c for c in out_spec if c.isdigit())
    window = _WINDOW.search(i.rest)
    w = _window(window.group(1) if window else '', len(spatial))
    macs = out[out_spec.index('b')] * out[out_spec.index('f')] * rhs[rhs_spec.index('i')]
    for n, d in enumerate(spatial):
      macs *= _taps(
        lhs[lhs_spec.index(d)],
        out[out_spec.index(d)],
        rhs[rhs_spec.index(d)],
        w['stride'][n],
        w['pad'][n],
        w['lhs_dilate'][n],
        w['rhs_dilate'][n],
      )
    return 2.0 * macs
  if i.op == 'dot' and (contracting := _CONTRACTING.search(i.rest)):
    lhs = _dims(shapes.get(i.operands[0], ''))
    inner = math.prod(lhs[int(d)] for d in contracting.group(1).split(',') if d)
    return 2.0 * math.prod(_dims(i.shape)) * inner
  return 0.0


def _labels(body: list[Instruction]) -> dict[str, str]:
  """{instruction: op_name}; one without (an async copy) takes its result's first labelled
  user's: a prefetch is charged to the op it feeds, a copy into the outputs to OUTPUT."""
  own = {i.name: m.group(1) for i in body if (m := _OP_NAME.search(i.rest))}
  own |= {i.name: OUTPUT for i in body if i.root and i.name not in own}
  users: dict[str, list[str]] = collections.defaultdict(list)
  for i in body:
    for operand in i.operands:
      users[operand].append(i.name)

  def label(name: str, depth: int = 0) -> str:
    if name in own or depth > 8:
      return own.get(name, '')
    return next((x for u in users.get(name, []) if (x := label(u, depth + 1))), '')

  return {i.name: label(i.name) for i in body}


def traffic(hlo_text: str) -> Traffic:
  """Our estimate of the HBM bytes one run of a compiled program moves (module docstring).

  Args:
    hlo_text: compiled.as_text() of a TPU program (the optimised, scheduled HLO).

  Raises:
    ValueError: text with no ENTRY computation.
  """
  computations, entry = parse(hlo_text)
  flops_of: dict[str, float] = {}

  def computation_flops(name: str) -> float:  # Of a fused (or called) computation.
    if name not in flops_of:
      body = computations.get(name, [])
      shapes = {i.name: i.shape for i in body}
      flops_of[name] = sum(op_flops(i, shapes) for i in body) + sum(
        computation_flops(c) for i in body if i.op == 'fusion' for c in _CALLS.findall(i.rest)
      )
    return flops_of[name]

  def walk(name: str, times: int, out: Traffic) -> Traffic:
    body = computations[name]
    shapes = {i.name: i.shape for i in body}
    labels = _labels(body)
    for i in body:
      if i.op in FREE:
        continue
      label = labels[i.name]
      kind = i.op.removesuffix('-start').removesuffix('-done')
      if i.op == 'while':
        trip = _TRIP.search(i.rest)
        out.exact &= trip is not None
        body_name = re.search(r'body=%([\w.\-]+)', i.rest).group(1)
        walk(body_name, times * (int(trip.group(1)) if trip else 1), out)
      elif i.op == 'call':
        walk(_CALLS.findall(i.rest)[0], times, out)
      elif i.op == 'conditional':  # The cheapest branch: the estimate stays a lower bound.
        branches = re.findall(r'%([\w.\-]+)', i.rest.split('branch_computations=')[-1])
        branches = [b for b in branches if b in computations] or _CALLS.findall(i.rest)
        costs = [walk(b, times, Traffic()) for b in branches]
        cheapest = min(costs, key=lambda t: t.bytes, default=Traffic())
        for op, n in cheapest.by_op.items():
          out.add(op, label, n)
        for part, f in cheapest.part_flops.items():  # FLOPs stay with the branch's parts.
          out.part_flops[part] += f
        out.exact &= all(c.exact for c in costs)
      elif i.op.endswith('-done'):
        out.add(kind, label, times * shape_bytes(i.shape))
      else:
        reads = [shape_bytes(shapes.get(o, '')) for o in i.operands]
        written = 0 if i.op.endswith('-start') else shape_bytes(i.shape)
        flops = op_flops(i, shapes)
        if kind in SLICES:
          reads[0] = _slice_read(i, shapes)
        elif i.op == 'fusion':
          called = _CALLS.findall(i.rest)[0]
          fused = computations[called]
          for k, n in _fusion_reads(fused).items():
            reads[k] = min(reads[k], n)
          written = _written(fused, i.shape)
          flops = computation_flops(called)
        out.add(kind, label, times * (sum(reads) + written), times * flops)
    return out

  return walk(entry, 1, Traffic())


def interconnect_bytes(kinds: dict[str, dict[str, Any]]) -> int:
  """Our estimate of the bytes a chip sends and receives over its links in a step.

  An all-reduce of S bytes sends and receives 2 S each (a reduce-scatter, then an all-gather,
  as a ring does): 4 S; every other collective (a halo's collective-permute, an all-gather)
  sends and receives its result once: 2 S. Set against the chip's bidirectional ICI
  bandwidth, that assumes every link busy, which a ring over one axis of the torus is not:
  an estimate, not a bound either way.

  Args:
    kinds: collectives(...) of the program.
  """
  return sum((4 if kind == 'all-reduce' else 2) * v['bytes'] for kind, v in kinds.items())


def collectives(hlo_text: str) -> dict[str, dict[str, Any]]:
  """Count and result bytes (per chip) of each collective kind in compiled HLO text.

  Args:
    hlo_text: compiled.as_text().

  Returns:
    {kind: {'count': n, 'bytes': total result bytes, 'dtypes': {HLO dtype: its bytes}}} for
    the kinds present (e.g. the gradients' all-reduce in f32 or bf16).
  """
  out: dict[str, dict[str, Any]] = {}
  for line in hlo_text.splitlines():
    match = _COLLECTIVE_OP.search(line)
    if not match:
      continue
    kind = out.setdefault(match.group(2), {'count': 0, 'bytes': 0, 'dtypes': {}})
    sizes = bytes_by_dtype(match.group(1))
    kind['count'] += 1
    kind['bytes'] += sum(sizes.values())
    for dtype, size in sizes.items():
      kind['dtypes'][dtype] = kind['dtypes'].get(dtype, 0) + size
  return out
