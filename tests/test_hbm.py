# ruff: noqa: E501 (HLO text: one instruction a line, as XLA prints it)
"""psp_jax.train.hbm: the HBM traffic estimate, on HLO text written here by hand (fast) and on
TPU programs compiled with libtpu whose traffic is counted by hand (slow, .venv-tpu)."""

import json
import subprocess

import pytest

from psp_jax.train import hbm

from helpers import ROOT


@pytest.mark.parametrize(
  ('shape', 'expected'),
  [
    ('bf16[2,60,60,256]{3,0,2,1:T(2,128)(2,1)}', 2 * 60 * 60 * 256 * 2),  # tiles fit: no pad
    ('f32[7,5]{1,0:T(8,128)}', 8 * 128 * 4),  # one tile, mostly padding
    ('f32[130,3]{1,0:T(8,128)}', 136 * 128 * 4),  # rows to 8, columns (minor) to 128
    ('f32[130,3]{0,1:T(8,128)}', 8 * 256 * 4),  # transposed layout: 130 is minor
    ('f32[7,5]{1,0:T(8,128)S(1)}', 0),  # VMEM
    ('u32[]{:S(2)}', 0),  # a sync flag
    ('f32[7,5]', 7 * 5 * 4),  # no layout: dense
    ('(f32[4]{0:T(128)}, s8[4,4])', 128 * 4 + 16),  # tuples add up
    ('pred[16,8]{0,1:T(8,128)(4,1)}', 8 * 128),
  ],
)
def test_array_bytes_at_tiled_layouts(shape, expected):
  assert hbm.shape_bytes(shape) == expected


# f32[1024,128] at T(8,128) is 512 KiB exactly; f32[8,128] 4 KiB.
BIG, ROW = 1024 * 128 * 4, 8 * 128 * 4
HLO = """HloModule m, is_scheduled=true

%sliced (param_0: f32[1024,128]) -> f32[8,128] {
  %param_0 = f32[1024,128]{1,0:T(8,128)} parameter(0)
  ROOT %slice.1 = f32[8,128]{1,0:T(8,128)} slice(%param_0), slice={[0:8], [0:128]}
}

%updated (param_0.1: f32[1024,128], param_1: f32[8,128], param_2: s32[]) -> f32[1024,128] {
  %param_0.1 = f32[1024,128]{1,0:T(8,128)} parameter(0)
  %param_1 = f32[8,128]{1,0:T(8,128)} parameter(1)
  %param_2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %dus = f32[1024,128]{1,0:T(8,128)} dynamic-update-slice(%param_0.1, %param_1, %param_2, %zero)
}

%doubled (param_0.2: f32[1024,128]) -> f32[1024,128] {
  %param_0.2 = f32[1024,128]{1,0:T(8,128)} parameter(0)
  ROOT %add = f32[1024,128]{1,0:T(8,128)} add(%param_0.2, %param_0.2)
}

%body (p: (s32[], f32[1024,128])) -> (s32[], f32[1024,128]) {
  %p = (s32[], f32[1024,128]{1,0:T(8,128)}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[1024,128]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %y = f32[1024,128]{1,0:T(8,128)} fusion(%x), kind=kLoop, calls=%doubled, metadata={op_name="jit(f)/while/body/mul"}
  ROOT %t = (s32[], f32[1024,128]{1,0:T(8,128)}) tuple(%i, %y)
}

%cond (p.1: (s32[], f32[1024,128])) -> pred[] {
  %p.1 = (s32[], f32[1024,128]{1,0:T(8,128)}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (a: f32[1024,128], b: f32[8,128]) -> (f32[8,128], f32[1024,128], f32[1024,128]) {
  %a = f32[1024,128]{1,0:T(8,128)} parameter(0), metadata={op_name="a"}
  %b = f32[8,128]{1,0:T(8,128)} parameter(1)
  %copy-start = (f32[1024,128]{1,0:T(8,128)S(1)}, f32[1024,128]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%a)
  %copy-done = f32[1024,128]{1,0:T(8,128)S(1)} copy-done(%copy-start)
  %s = f32[8,128]{1,0:T(8,128)} fusion(%copy-done), kind=kLoop, calls=%sliced
  %h = f32[8,128]{1,0:T(8,128)} fusion(%a), kind=kLoop, calls=%sliced, metadata={op_name="jit(f)/head/slice"}
  %k = s32[] constant(3)
  %u = f32[1024,128]{1,0:T(8,128)} fusion(%a, %b, %k), kind=kLoop, calls=%updated
  %zero.1 = s32[] constant(0)
  %init = (s32[], f32[1024,128]{1,0:T(8,128)}) tuple(%zero.1, %u)
  %w = (s32[], f32[1024,128]{1,0:T(8,128)}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %wx = f32[1024,128]{1,0:T(8,128)} get-tuple-element(%w), index=1
  %ar-start = f32[1024,128]{1,0:T(8,128)} all-reduce-start(%wx), replica_groups={{0,1}}, to_apply=%doubled
  %ar-done = f32[1024,128]{1,0:T(8,128)} all-reduce-done(%ar-start)
  ROOT %out = (f32[8,128]{1,0:T(8,128)}, f32[1024,128]{1,0:T(8,128)}, f32[1024,128]{1,0:T(8,128)}) tuple(%h, %u, %ar-done)
}
"""


def test_each_rule_on_a_program_counted_by_hand():
  got = hbm.traffic(HLO)
  assert got.exact
  expected = {
    'copy': BIG,  # a's prefetch into VMEM: read once; the VMEM copy itself is free.
    'fusion': (
      0  # %s slices the VMEM copy: nothing from HBM, and writes its slice...
      + ROW  # ... to HBM.
      + 2 * ROW  # %h reads only its slice of a and writes it.
      + 2 * ROW  # %u updates a in place: reads b, writes one row block of a...
      + 4  # ... at index k, a constant it reads.
      + 4 * 2 * BIG  # the loop body, 4 times: reads x, writes y.
    ),
    'all-reduce': 2 * BIG,  # -start reads the operand, -done writes the result: once.
  }
  assert dict(got.by_op) == expected
  assert got.bytes == sum(expected.values())
  assert got.by_name['jit(f)/while/body/mul'] == 4 * 2 * BIG
  assert got.by_name['jit(f)/head/slice'] == 2 * ROW


def test_an_unknown_trip_count_is_not_exact():
  text = HLO.replace(', backend_config={"known_trip_count":{"n":"4"}}', '')
  got = hbm.traffic(text)
  assert not got.exact and got.by_name['jit(f)/while/body/mul'] == 2 * BIG
  with pytest.raises(ValueError, match='ENTRY'):
    hbm.traffic(text.replace('ENTRY ', ''))


@pytest.mark.slow  # TPU compiles with libtpu, in .venv-tpu.
@pytest.mark.e2e
def test_compiled_programs_match_their_hand_counts(tpu_python):
  """benchmarks/hbm_check.py compiles each program for v5e; estimate against hand count."""
  proc = subprocess.run(
    [str(tpu_python), str(ROOT / 'benchmarks' / 'hbm_check.py'), '--json'],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(proc.stdout.strip().splitlines()[-1])
  assert {r['program'] for r in rows} >= {'matmul', 'conv 3x3', 'all-reduce', 'donated update'}
  for row in rows:
    low, high = row['hand_bytes'], row['hand_bytes'] + row['hand_extra_bytes']
    assert 0.9 * low <= row['estimate_bytes'] <= 1.1 * high, row
  dots = [r for r in rows if r['kind'] == 'dot']
  assert dots and all(r['xla_bytes'] > 4 * r['estimate_bytes'] for r in dots if not r['grad'])
  # The breakdown's FLOPs, as compiled: within 10% of XLA's count, never under the hand
  # count (a dilated conv compiles to more taps: +20% at dilation 4), and at it for a matmul.
  for row in dots:
    assert 0.9 <= row['our_flops'] / row['xla_flops'] <= 1.1, row
    assert row['our_flops'] >= 0.999 * row['hand_flops'], row
  assert all(r['our_flops'] == r['hand_flops'] for r in dots if 'matmul' in r['program'])


PARTS_HLO = """HloModule m, is_scheduled=true

%conv_fusion (param_0: bf16[2,60,60,256], param_1: bf16[3,3,256,256]) -> bf16[2,60,60,256] {
  %param_0 = bf16[2,60,60,256]{3,2,1,0} parameter(0)
  %param_1 = bf16[3,3,256,256]{3,2,1,0} parameter(1)
  ROOT %convolution = bf16[2,60,60,256]{3,2,1,0} convolution(%param_0, %param_1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(guarded)/transpose(jvp(PSPNet))/backbone/layer3/2/conv2/conv_general_dilated"}
}

ENTRY %main (x: bf16[2,60,60,256], w: bf16[3,3,256,256], a: f32[64,32], b: f32[32,16], y: bf16[2,30,30,256]) -> (bf16[2,60,60,256], bf16[2,60,60,256], f32[64,16]) {
  %x = bf16[2,60,60,256]{3,2,1,0} parameter(0)
  %w = bf16[3,3,256,256]{3,2,1,0} parameter(1), metadata={op_name="state.params['ppm']['conv']"}
  %a = f32[64,32]{1,0} parameter(2)
  %b = f32[32,16]{1,0} parameter(3)
  %y = bf16[2,30,30,256]{3,2,1,0} parameter(4)
  %copy-start = (bf16[3,3,256,256]{3,2,1,0:S(1)}, bf16[3,3,256,256]{3,2,1,0}, u32[]{:S(2)}) copy-start(%w)
  %copy-done = bf16[3,3,256,256]{3,2,1,0:S(1)} copy-done(%copy-start)
  %f = bf16[2,60,60,256]{3,2,1,0} fusion(%x, %copy-done), kind=kOutput, calls=%conv_fusion, metadata={op_name="jit(guarded)/transpose(jvp(PSPNet))/backbone/layer3/2/conv2/conv_general_dilated"}
  %t = bf16[2,60,60,256]{3,2,1,0} convolution(%y, %w), window={size=3x3 pad=1_2x1_2 lhs_dilate=2x2}, dim_labels=b01f_01io->b01f, metadata={op_name="jit(guarded)/transpose(jvp(PSPNet))/ppm/1/conv/conv_general_dilated"}
  %d = f32[64,16]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(guarded)/jvp(PSPNet)/abcd,zb->azcd/dot_general"}
  %ar = f32[64,16]{1,0} all-reduce(%d), replica_groups={{0,1}}, to_apply=%conv_fusion, metadata={op_name="jit(guarded)/transpose(jvp(PSPNet))/backbone/layer1/0/bn1/psum"}
  %o = f32[64,16]{1,0} copy(%ar)
  ROOT %out = (bf16[2,60,60,256]{3,2,1,0}, bf16[2,60,60,256]{3,2,1,0}, f32[64,16]{1,0}) tuple(%f, %t, %o)
}
"""


def test_flops_and_bytes_by_model_part():
  got = hbm.traffic(PARTS_HLO)
  x, w, y, d = 2 * 60 * 60 * 256 * 2, 9 * 256 * 256 * 2, 2 * 30 * 30 * 256 * 2, 64 * 16 * 4
  # 3 taps for each of 60 outputs a dimension, less the 2 on the padding.
  assert got.part_flops['layer3'] == 2 * 2 * 256 * 256 * (60 * 3 - 2) ** 2
  # Transposed (lhs_dilate 2): an odd output meets 2 of y's 30 elements (the last one only 1),
  # an even one 1: 29 x 2 + 1 + 30 = 89 a dimension.
  assert got.part_flops['PPM'] == 2 * 2 * 256 * 256 * 89**2
  assert got.part_flops['upsample and loss'] == 2 * 64 * 16 * 32
  assert got.part_bytes['layer3'] == w + x + x  # Its weights' prefetch, then x in, f out.
  assert got.part_bytes['PPM'] == y + w + x
  assert got.part_bytes['collectives'] == 2 * d  # SyncBN's psum is a collective, not BN.
  assert got.part_bytes['optimiser and guard'] == 2 * d  # A copy only the outputs use.
  assert sum(got.part_bytes.values()) == got.bytes and set(got.part_bytes) <= set(hbm.PART_NAMES)


@pytest.mark.parametrize(
  ('label', 'op', 'part'),
  [
    ('jit(guarded)/jvp(PSPNet)/backbone/layer0/conv1/conv_general_dilated', 'fusion', 'stem'),
    ('jit(guarded)/jvp(PSPNet)/backbone/convert_element_type', 'convert', 'stem'),
    (
      'jit(guarded)/transpose(jvp(PSPNet))/backbone/layer2/0/downsample/bn/mul',
      'fusion',
      'BatchNorm',
    ),
    ('jit(guarded)/jvp(PSPNet)/backbone/layer4/1/bn2/add', 'fusion', 'BatchNorm'),
    ('jit(guarded)/jvp(PSPNet)/backbone/layer4/1/conv2/conv_general_dilated', 'fusion', 'layer4'),
    ('jit(guarded)/jvp(PSPNet)/ppm/3/abcd,zc->abzd/dot_general', 'fusion', 'PPM'),
    ('jit(guarded)/jvp(PSPNet)/aux/dropout/jit(_bernoulli)/jit(_uniform)/shift', 'fusion', 'heads'),
    ('jit(guarded)/transpose(jvp(PSPNet))/cls/conv2/transpose()/conv', 'fusion', 'heads'),
    ('jit(guarded)/jvp(jit(take_along_axis))/gather', 'fusion', 'upsample and loss'),
    ('jit(guarded)/transpose(jvp())/div', 'fusion', 'upsample and loss'),
    ("batch[\\'label\\']", 'copy', 'upsample and loss'),
    ("batch[\\'image\\']", 'copy', 'stem'),
    ('jit(guarded)/jit(_where)/select_n', 'fusion', 'optimiser and guard'),
    ("state.opt_state[1].trace[\\'cls\\']", 'copy', 'optimiser and guard'),
    ('jit(guarded)/jvp(PSPNet)/backbone/layer1/0/bn1/psum', 'all-reduce', 'collectives'),
    ('jit(guarded)/jit(_threefry_fold_in)/make_train_step.<locals>.train_step/xor', 'xor', 'other'),
    ('', 'copy', 'other'),
  ],
)
def test_model_parts_by_op_name(label, op, part):
  assert hbm.part_of(label, op) == part
